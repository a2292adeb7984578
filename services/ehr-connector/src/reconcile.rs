//! Reconciliation: reads back what the EHR holds for recently acknowledged artifacts and
//! records `EhrDriftDetected` on the encounter stream where it differs from what was
//! acknowledged — the resource is gone, its status changed, someone else moved its
//! version on, the note is missing, or its identifier is held twice.
//!
//! Per encounter with an acknowledgement in the window: fold the stream; for every
//! artifact whose last outcome is a `WriteBackSucceeded` that follows its last
//! due-making event (an artifact due again is the connector's business, not drift), map
//! the resources it consists of ([`resources_for`], the same pure mapping the connector
//! wrote), search each by its business identifier and [`compare`]. Each finding goes
//! through the shared command path as `DetectEhrDrift`.
//!
//! Idempotency: the command id derives from (tenant, stream, artifact, stream version of
//! the acknowledgement, kind, resource, found), and the domain records nothing for a
//! finding still open on the artifact — so re-running on an unchanged EHR records
//! nothing, and a new finding is recorded once. A failed read records nothing (an error
//! answer is never read as "gone"). The domain refuses drift against anything but the
//! artifact's current acknowledgement, so a read-back that raced a newer write of ours
//! records nothing either.
//!
//! Resolution: the next `WriteBackSucceeded` of the artifact clears its open drift — a
//! re-write (`chartline fhir retry`, or any later change of the encounter) repairs the
//! EHR, and the following run compares against the new acknowledgement.

use std::collections::HashMap;
use std::time::Duration;

use chartline_domain::encounter::{
    DriftKind, Encounter, EncounterCommand, EncounterEvent, WriteBackArtifact, WriteBackState,
};
use chartline_infra::EventStore;
use chartline_infra::command::{CommandContext, derived_uuid, execute};
use chartline_infra::store::{ReadScope, read_whole_stream};
use chartline_proto::codec::decode;
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, StreamId, TenantId};
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::fhir::{BusinessKey, EncounterRecord, artifact_name, resources_for};
use crate::reactor::{Connector, write_back_versions};
use crate::stream_time::at_stream_time;

/// Actor and command-id namespace of the reconciliation job.
pub const RECONCILER_NAME: &str = "ehr-reconciler";

/// One difference between the EHR and an acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub kind: DriftKind,
    /// `Type/id`, or `Type?identifier=system|value` when no single resource is meant.
    pub resource: String,
    pub expected: String,
    pub found: String,
}

/// A finding on one artifact of one encounter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Drift {
    pub tenant: String,
    pub encounter_id: String,
    pub artifact: String,
    /// The acknowledgement compared against (`Type/id`, version).
    pub acknowledged: String,
    pub acknowledged_version: String,
    #[serde(flatten)]
    pub finding: Finding,
    /// Recorded by this run (false: already recorded and still open).
    pub new: bool,
}

/// What one run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReconcileReport {
    pub encounters: usize,
    pub artifacts: usize,
    pub drift: Vec<Drift>,
    /// Reads or commands that failed; those artifacts are tried again next run.
    pub errors: Vec<String>,
}

impl ReconcileReport {
    pub fn recorded(&self) -> usize {
        self.drift.iter().filter(|d| d.new).count()
    }
}

fn condition_of(key: &BusinessKey) -> String {
    format!("{}?{}", key.resource_type, key.condition())
}

fn reference(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap_or_default(),
        resource["id"].as_str().unwrap_or_default()
    )
}

fn field_text(resource: &Value, field: &str) -> String {
    format!("{field} {}", resource[field].as_str().unwrap_or("(none)"))
}

fn has_attachment(resource: &Value) -> bool {
    resource["content"].as_array().is_some_and(|content| {
        content.iter().any(|c| {
            c["attachment"]["data"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        })
    })
}

/// Compares what the EHR holds (`held[i]`: every resource the business key of
/// `expected[i]` finds) with what was written and acknowledged. `expected[0]` is the
/// artifact's main resource, acknowledged as `acknowledged` (`Type/id`) at
/// `acknowledged_version`; the others (Composition, Provenance) were written with it.
/// Pure: no IO.
pub fn compare(
    expected: &[Value],
    held: &[Vec<Value>],
    acknowledged: &str,
    acknowledged_version: &str,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (index, (written, found)) in expected.iter().zip(held).enumerate() {
        let Some(key) = BusinessKey::of(written) else {
            continue;
        };
        let main = index == 0;
        let is_note = key.resource_type == "Composition";
        let current = match found.as_slice() {
            [] => {
                findings.push(Finding {
                    kind: if is_note {
                        DriftKind::NoteMissing
                    } else {
                        DriftKind::Missing
                    },
                    resource: if main {
                        acknowledged.to_string()
                    } else {
                        condition_of(&key)
                    },
                    expected: if main {
                        format!("{acknowledged} version {acknowledged_version}")
                    } else {
                        key.resource_type.clone()
                    },
                    found: "absent".into(),
                });
                continue;
            }
            [one] => one,
            many => {
                findings.push(Finding {
                    kind: DriftKind::Duplicated,
                    resource: condition_of(&key),
                    expected: "1 resource".into(),
                    found: format!("{} resources", many.len()),
                });
                continue;
            }
        };
        if main && reference(current) != acknowledged {
            // The acknowledged resource is gone; another one carries the identifier.
            findings.push(Finding {
                kind: DriftKind::Missing,
                resource: acknowledged.to_string(),
                expected: format!("{acknowledged} version {acknowledged_version}"),
                found: reference(current),
            });
            continue;
        }
        let mut status_changed = false;
        for field in ["status", "docStatus"] {
            if written.get(field).is_some() && written[field] != current[field] {
                status_changed = true;
                findings.push(Finding {
                    kind: DriftKind::StatusChanged,
                    resource: reference(current),
                    expected: field_text(written, field),
                    found: field_text(current, field),
                });
            }
        }
        if key.resource_type == "DocumentReference"
            && has_attachment(written)
            && !has_attachment(current)
        {
            findings.push(Finding {
                kind: DriftKind::NoteMissing,
                resource: reference(current),
                expected: "attachment with the note".into(),
                found: "no attachment".into(),
            });
            status_changed = true;
        }
        let version = current["meta"]["versionId"].as_str().unwrap_or_default();
        if main && !status_changed && version != acknowledged_version {
            findings.push(Finding {
                kind: DriftKind::VersionChanged,
                resource: reference(current),
                expected: format!("version {acknowledged_version}"),
                found: format!(
                    "version {}",
                    if version.is_empty() {
                        "(none)"
                    } else {
                        version
                    }
                ),
            });
        }
    }
    findings
}

/// Parses `90s`, `15m`, `24h`, `7d` (or plain seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 24h or 7d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use s, m, h or d)"
            ));
        }
    };
    Ok(Duration::from_secs(value * seconds))
}

/// The reconciliation job for one EHR (the connector's client: its auth, token cache and
/// circuit breaker). Keeps an in-memory index of encounters with recent
/// acknowledgements, so a periodic run reads only the log's new events.
pub struct Reconciler<S: EventStore> {
    store: S,
    connector: Connector<S>,
    scanned_to: u64,
    /// Encounter stream → `recorded_at` of its latest acknowledgement.
    recent: HashMap<(TenantId, StreamId), DateTime<Utc>>,
}

impl<S: EventStore> Reconciler<S> {
    pub fn new(store: S, connector: Connector<S>) -> Reconciler<S> {
        Reconciler {
            store,
            connector,
            scanned_to: 0,
            recent: HashMap::new(),
        }
    }

    async fn scan(&mut self) -> Result<(), String> {
        loop {
            let page = self
                .store
                .read_all(&ReadScope::AllTenants, self.scanned_to, 5_000)
                .await
                .map_err(|e| e.to_string())?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            self.scanned_to = last.global_position;
            for event in page
                .iter()
                .filter(|e| e.category() == "encounter" && e.event_type == "WriteBackSucceeded")
            {
                self.recent.insert(
                    (event.metadata.tenant.clone(), event.stream_id.clone()),
                    event.recorded_at,
                );
            }
        }
    }

    /// Checks every encounter with an acknowledgement recorded within `window` of `now`.
    pub async fn run_once(&mut self, window: Duration, now: DateTime<Utc>) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        if let Err(error) = self.scan().await {
            report.errors.push(format!("reading the log: {error}"));
            return report;
        }
        let since = now - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        self.recent.retain(|_, at| *at >= since);
        let mut streams: Vec<(TenantId, StreamId)> = self.recent.keys().cloned().collect();
        streams.sort();
        for (tenant, stream) in streams {
            report.encounters += 1;
            self.reconcile_encounter(&tenant, &stream, now, &mut report)
                .await;
        }
        report
    }

    /// Runs every `interval` until `shutdown` resolves (the first run right away).
    pub async fn run(
        mut self,
        interval: Duration,
        window: Duration,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), String> {
        tokio::pin!(shutdown);
        loop {
            let report = self.run_once(window, Utc::now()).await;
            if report.recorded() > 0 || !report.errors.is_empty() {
                tracing::warn!(
                    encounters = report.encounters,
                    artifacts = report.artifacts,
                    recorded = report.recorded(),
                    open = report.drift.len(),
                    errors = ?report.errors,
                    "EHR reconciliation"
                );
            } else {
                tracing::debug!(
                    encounters = report.encounters,
                    open = report.drift.len(),
                    "EHR reconciliation"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
    }

    /// Reconciles one encounter now (CLI, tests).
    pub async fn reconcile_encounter(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        now: DateTime<Utc>,
        report: &mut ReconcileReport,
    ) {
        let history = match read_whole_stream(&self.store, tenant, stream).await {
            Ok(history) => history,
            Err(error) => {
                report.errors.push(format!("{stream}: {error}"));
                return;
            }
        };
        let Ok(events) = history
            .iter()
            .map(decode::<EncounterEvent>)
            .collect::<Result<Vec<_>, _>>()
        else {
            report.errors.push(format!("{stream}: an unreadable event"));
            return;
        };
        let record = EncounterRecord::from_events(tenant.as_str(), &events);
        let encounter_id = stream.id_part().to_string();
        for status in &record.state.write_backs {
            if status.state != WriteBackState::Succeeded {
                continue;
            }
            let artifact = &status.artifact;
            let (Some(acknowledged), Some(version)) =
                (&status.ehr_resource_id, &status.ehr_version)
            else {
                continue;
            };
            let (due_version, covered_version) = write_back_versions(&history, &events, artifact);
            if covered_version <= due_version {
                continue; // due again: the connector will write it
            }
            let Some(ack) = history.iter().zip(&events).rev().find_map(|(envelope, event)| {
                matches!(event, EncounterEvent::WriteBackSucceeded(e) if &e.artifact == artifact)
                    .then_some(envelope)
            }) else {
                continue;
            };
            report.artifacts += 1;
            let expected = resources_for(&record, artifact);
            let mut held = Vec::with_capacity(expected.len());
            let mut read_failed = false;
            for resource in &expected {
                let Some(key) = BusinessKey::of(resource) else {
                    held.push(Vec::new());
                    continue;
                };
                match self.connector.client().search(&key).await {
                    Ok(found) => held.push(found),
                    Err(error) => {
                        report
                            .errors
                            .push(format!("{stream} {}: {error}", artifact_name(artifact)));
                        read_failed = true;
                        break;
                    }
                }
            }
            if read_failed {
                continue;
            }
            for finding in compare(&expected, &held, acknowledged, version) {
                let already_open = status.drift.iter().any(|d| {
                    d.kind == finding.kind
                        && d.resource == finding.resource
                        && d.found == finding.found
                });
                let new = if already_open {
                    false
                } else {
                    match self
                        .record(
                            tenant,
                            stream,
                            artifact,
                            acknowledged,
                            version,
                            ack,
                            &finding,
                            record.state.last_event_at.unwrap_or(now),
                            now,
                        )
                        .await
                    {
                        Ok(new) => new,
                        Err(error) => {
                            report.errors.push(format!(
                                "{stream} {}: recording drift: {error}",
                                artifact_name(artifact)
                            ));
                            continue;
                        }
                    }
                };
                report.drift.push(Drift {
                    tenant: tenant.to_string(),
                    encounter_id: encounter_id.clone(),
                    artifact: artifact_name(artifact),
                    acknowledged: acknowledged.clone(),
                    acknowledged_version: version.clone(),
                    finding,
                    new,
                });
            }
        }
    }

    /// `DetectEhrDrift` through the command path; true when an event was appended.
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        artifact: &WriteBackArtifact,
        acknowledged: &str,
        version: &str,
        ack: &chartline_proto::EventEnvelope,
        finding: &Finding,
        stream_time: DateTime<Utc>,
        detected_at: DateTime<Utc>,
    ) -> Result<bool, String> {
        let kind = serde_json::to_string(&finding.kind).unwrap_or_default();
        let context = CommandContext {
            tenant: tenant.clone(),
            command_id: derived_uuid(&[
                RECONCILER_NAME,
                tenant.as_str(),
                stream.as_str(),
                &artifact_name(artifact),
                &ack.stream_version.to_string(),
                &kind,
                &finding.resource,
                &finding.found,
            ]),
            actor: Actor::new(ActorKind::Service, RECONCILER_NAME),
            correlation_id: ack.metadata.correlation_id,
            source: "ehr-connector".into(),
        };
        // Stream time: the encounter's latest fact (never later, so the drift cannot push
        // another system's facts into the past); re-read when a newer one lands.
        let context = &context;
        let reply = at_stream_time(
            stream_time,
            5,
            |at| {
                let command = EncounterCommand::DetectEhrDrift {
                    artifact: artifact.clone(),
                    acknowledged_resource_id: acknowledged.to_string(),
                    acknowledged_version: version.to_string(),
                    kind: finding.kind,
                    resource: finding.resource.clone(),
                    expected: finding.expected.clone(),
                    found: finding.found.clone(),
                    detected_at,
                    at,
                };
                async move { execute::<Encounter, S>(&self.store, stream, &command, context).await }
            },
            || async {
                let history = read_whole_stream(&self.store, tenant, stream).await?;
                Ok::<_, chartline_infra::StoreError>(
                    history
                        .iter()
                        .filter_map(|envelope| decode::<EncounterEvent>(envelope).ok())
                        .map(|event| event.at())
                        .max(),
                )
            },
        )
        .await;
        match reply {
            CommandReply::Accepted { event_ids, .. } => Ok(!event_ids.is_empty()),
            CommandReply::Rejected { code, message } => Err(format!("{code:?}: {message}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn appointment(status: &str) -> Value {
        json!({"resourceType": "Appointment", "status": status,
            "identifier": [{"system": "urn:chartline:t:appointment", "value": "a1"}]})
    }

    fn held(resource: &Value, id: &str, version: &str) -> Value {
        let mut copy = resource.clone();
        copy["id"] = json!(id);
        copy["meta"] = json!({"versionId": version});
        copy
    }

    #[test]
    fn an_unchanged_ehr_is_no_drift() {
        let written = appointment("booked");
        let found = vec![vec![held(&written, "x", "2")]];
        assert_eq!(
            compare(&[written], &found, "Appointment/x", "2"),
            Vec::<Finding>::new()
        );
    }

    #[test]
    fn each_kind_of_drift_is_found() {
        let written = appointment("fulfilled");
        let gone = compare(
            std::slice::from_ref(&written),
            &[vec![]],
            "Appointment/x",
            "2",
        );
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].kind, DriftKind::Missing);
        assert_eq!(gone[0].found, "absent");
        let changed = compare(
            std::slice::from_ref(&written),
            &[vec![held(&appointment("cancelled"), "x", "3")]],
            "Appointment/x",
            "2",
        );
        assert_eq!(
            changed,
            vec![Finding {
                kind: DriftKind::StatusChanged,
                resource: "Appointment/x".into(),
                expected: "status fulfilled".into(),
                found: "status cancelled".into(),
            }]
        );
        let moved = compare(
            std::slice::from_ref(&written),
            &[vec![held(&written, "x", "3")]],
            "Appointment/x",
            "2",
        );
        assert_eq!(moved[0].kind, DriftKind::VersionChanged);
        assert_eq!(moved[0].found, "version 3");
        let twice = compare(
            std::slice::from_ref(&written),
            &[vec![held(&written, "x", "2"), held(&written, "y", "1")]],
            "Appointment/x",
            "2",
        );
        assert_eq!(twice[0].kind, DriftKind::Duplicated);
        let replaced = compare(
            std::slice::from_ref(&written),
            &[vec![held(&written, "y", "1")]],
            "Appointment/x",
            "2",
        );
        assert_eq!(replaced[0].kind, DriftKind::Missing);
        assert_eq!(replaced[0].found, "Appointment/y");
    }

    #[test]
    fn a_lost_note_is_note_missing() {
        let document = json!({"resourceType": "DocumentReference", "status": "current", "docStatus": "final",
            "identifier": [{"system": "urn:chartline:t:document", "value": "d1"}],
            "content": [{"attachment": {"contentType": "text/plain", "data": "U09BUA=="}}]});
        let composition = json!({"resourceType": "Composition", "status": "final",
            "identifier": {"system": "urn:chartline:t:composition", "value": "c1"}});
        let mut stripped = held(&document, "d", "1");
        stripped["content"] = json!([{"attachment": {"contentType": "text/plain"}}]);
        let findings = compare(
            &[document, composition],
            &[vec![stripped], vec![]],
            "DocumentReference/d",
            "1",
        );
        let kinds: Vec<DriftKind> = findings.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [DriftKind::NoteMissing, DriftKind::NoteMissing]);
        assert_eq!(
            findings[1].resource,
            "Composition?identifier=urn:chartline:t:composition|c1"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5w").is_err());
    }
}
