//! RPM Observation write-back: every `ReadingsRecorded` batch on an RPM enrolment
//! stream becomes one artifact — one vital-signs Observation per reading, identifier
//! `<batch_id>-<index>` ([`observations_for`]) — written by the same connector, gated on
//! the patient's identity like encounter artifacts, with the outcome recorded on the
//! enrolment stream (`ObservationsWrittenBack` / `ObservationWriteBackFailed`).
//!
//! Idempotency follows the encounter artifacts: a batch never changes once recorded, so
//! any outcome on the stream makes it up to date (redelivery and a re-run from
//! checkpoint 0 send and append nothing; a dead failure waits for a replay); command ids
//! derive from (tenant, stream, batch); each Observation is an idempotent upsert by its
//! business key, and one batch's writes are serialized by the per-key lock.

use chartline_domain::Aggregate;
use chartline_domain::rpm::{ObservationAck, Reading, RpmCommand, RpmEnrollment, RpmEvent};
use chartline_infra::EventStore;
use chartline_infra::command::{CommandContext, derived_uuid, execute};
use chartline_infra::store::read_whole_stream;
use chartline_proto::codec::decode;
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, StreamId, TenantId};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::fhir::observations_for;
use crate::reactor::{Connector, JobOutcome};
use crate::stream_time::at_stream_time;

/// Builds the outcome command for a given `at` (re-built when a newer fact lands).
type MakeRpmCommand = Box<dyn Fn(DateTime<Utc>) -> RpmCommand + Send + Sync>;

/// One readings batch of one enrolment to bring into the EHR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservationJob {
    pub tenant: TenantId,
    pub stream: StreamId,
    pub batch_id: Uuid,
    /// Set by an explicit replay: bypasses the up-to-date check, fresh command ids.
    pub replay: Option<Uuid>,
}

struct Loaded {
    state: RpmEnrollment,
    batches: Vec<(Uuid, Vec<Reading>)>,
    correlation_id: Uuid,
}

pub(crate) fn log_observation_outcome(job: &ObservationJob, outcome: &JobOutcome) {
    match outcome {
        JobOutcome::Error(error) => {
            tracing::warn!(stream = %job.stream, batch = %job.batch_id, %error, "ehr observation write-back job failed")
        }
        JobOutcome::Parked(identity) => {
            tracing::info!(stream = %job.stream, batch = %job.batch_id, ?identity, "observation write-back waits for identity resolution")
        }
        other => {
            tracing::debug!(stream = %job.stream, batch = %job.batch_id, ?other, "ehr observation write-back job")
        }
    }
}

/// Attempts at recording an outcome while newer facts keep landing on the stream (a
/// device syncing a backlog appends batch after batch).
const MAX_TIME_RACES: usize = 25;

impl<S: EventStore> Connector<S> {
    async fn load_enrollment(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Loaded, String> {
        let history = read_whole_stream(&self.inner.store, tenant, stream)
            .await
            .map_err(|e| e.to_string())?;
        let mut loaded = Loaded {
            state: RpmEnrollment::default(),
            batches: Vec::new(),
            correlation_id: history
                .last()
                .map_or_else(Uuid::now_v7, |e| e.metadata.correlation_id),
        };
        for envelope in &history {
            let event = decode::<RpmEvent>(envelope).map_err(|e| e.to_string())?;
            if let RpmEvent::ReadingsRecorded {
                batch_id, readings, ..
            } = &event
            {
                loaded.batches.push((*batch_id, readings.clone()));
            }
            loaded.state.apply(&event);
        }
        Ok(loaded)
    }

    /// Writes one readings batch as Observations and records the outcome.
    pub async fn process_observations(&self, job: &ObservationJob) -> JobOutcome {
        let _key = self
            .inner
            .locks
            .lock(format!(
                "{}/{}/observations:{}",
                job.tenant, job.stream, job.batch_id
            ))
            .await;
        let loaded = match self.load_enrollment(&job.tenant, &job.stream).await {
            Ok(loaded) => loaded,
            Err(error) => return JobOutcome::Error(error),
        };
        let Some((_, readings)) = loaded.batches.iter().find(|(b, _)| *b == job.batch_id) else {
            return JobOutcome::NotDue;
        };
        if job.replay.is_none() && loaded.state.observation_write_back(&job.batch_id).is_some() {
            return JobOutcome::UpToDate;
        }
        let Some(patient_id) = loaded.state.patient_id else {
            return JobOutcome::NotDue;
        };
        let identity = match self.identity(&job.tenant, patient_id).await {
            Ok(identity) => identity,
            Err(error) => return JobOutcome::Error(error.to_string()),
        };
        if !identity.allows_chart_writes() {
            return JobOutcome::Parked(identity);
        }
        let mut acks = Vec::with_capacity(readings.len());
        let mut failure = None;
        for observation in observations_for(job.tenant.as_str(), patient_id, job.batch_id, readings)
        {
            match self.inner.client.upsert(&observation).await {
                Ok(written) => acks.push(ObservationAck {
                    ehr_resource_id: format!("{}/{}", written.resource_type, written.id),
                    ehr_version: written.version,
                }),
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let batch_id = job.batch_id;
        let (outcome, make): (JobOutcome, MakeRpmCommand) = match failure {
            None => (
                JobOutcome::Acknowledged {
                    resource: acks
                        .first()
                        .map(|a| a.ehr_resource_id.clone())
                        .unwrap_or_default(),
                    version: format!("{} observations", acks.len()),
                },
                Box::new(move |at| RpmCommand::RecordObservationsWrittenBack {
                    batch_id,
                    patient_identity: identity,
                    observations: acks.clone(),
                    at,
                }),
            ),
            Some(failure) => {
                tracing::warn!(stream = %job.stream, batch = %batch_id, status = ?failure.status, message = %failure.message, retryable = failure.retryable, "EHR observation write-back failed");
                let recorded = failure.clone();
                (
                    JobOutcome::Failed {
                        status: failure.status,
                        message: failure.message,
                        retryable: failure.retryable,
                    },
                    Box::new(move |at| RpmCommand::RecordObservationWriteBackFailed {
                        batch_id,
                        status: recorded.status,
                        message: recorded.message.clone(),
                        retryable: recorded.retryable,
                        at,
                    }),
                )
            }
        };
        let replay = job.replay.map(|id| id.to_string()).unwrap_or_default();
        let context = CommandContext {
            tenant: job.tenant.clone(),
            command_id: derived_uuid(&[
                "ehr-connector-rpm",
                job.tenant.as_str(),
                job.stream.as_str(),
                &batch_id.to_string(),
                &replay,
                "outcome",
            ]),
            actor: Actor::new(ActorKind::Service, self.inner.name.clone()),
            correlation_id: loaded.correlation_id,
            source: "ehr-connector".into(),
        };
        // Stream time: the enrolment's latest fact, never later (as for encounters).
        let at = loaded.state.last_event_at.unwrap_or_else(Utc::now);
        // A device that syncs a backlog appends batch after batch: each attempt may lose
        // the race to the next one, so allow more attempts than for encounters.
        let (make, context) = (&make, &context);
        let reply = at_stream_time(
            at,
            MAX_TIME_RACES,
            |at| async move {
                execute::<RpmEnrollment, S>(&self.inner.store, &job.stream, &make(at), context)
                    .await
            },
            || async {
                let newer = self.load_enrollment(&job.tenant, &job.stream).await;
                if let Err(error) = &newer {
                    tracing::warn!(stream = %job.stream, %error, "re-reading the enrolment failed");
                }
                newer.map(|newer| newer.state.last_event_at)
            },
        )
        .await;
        match reply {
            CommandReply::Accepted { .. } => outcome,
            CommandReply::Rejected { code, message } => JobOutcome::Error(format!(
                "recording the observation outcome was rejected ({code:?}): {message}"
            )),
        }
    }

    /// Replays one batch now (after a fix for a dead write-back), whatever its state.
    pub async fn retry_observations(
        &self,
        tenant: &TenantId,
        enrollment_id: Uuid,
        batch_id: Uuid,
    ) -> JobOutcome {
        self.process_observations(&ObservationJob {
            tenant: tenant.clone(),
            stream: StreamId::for_aggregate("rpm", enrollment_id),
            batch_id,
            replay: Some(Uuid::now_v7()),
        })
        .await
    }

    /// Every batch of an enrolment without an outcome (after an identity resolution).
    pub(crate) async fn process_all_observations_due(&self, tenant: &TenantId, stream: &StreamId) {
        let Ok(loaded) = self.load_enrollment(tenant, stream).await else {
            return;
        };
        for (batch_id, _) in &loaded.batches {
            if loaded.state.observation_write_back(batch_id).is_some() {
                continue;
            }
            let job = ObservationJob {
                tenant: tenant.clone(),
                stream: stream.clone(),
                batch_id: *batch_id,
                replay: None,
            };
            log_observation_outcome(&job, &self.process_observations(&job).await);
        }
    }
}
