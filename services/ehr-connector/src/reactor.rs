//! The write-back reactor: follows the global log from an event-sourced checkpoint and
//! writes each encounter artifact that becomes due to the EHR, recording the outcome on
//! the encounter stream through the shared command path (as the billing reactor does).
//!
//! Per artifact: load the encounter and the patient's identity → `RequestWriteBack`
//! (the domain refuses it while identity is pending or in review: then nothing is
//! recorded or sent, and the artifact is picked up again when the patient's
//! `IdentifierLinked` / `MatchResolved` / `NewPatientConfirmed` arrives) → idempotent
//! upsert of its resources → `RecordWriteBackSucceeded` (resource id + version) or
//! `RecordWriteBackFailed` (status, OperationOutcome text, retryable).
//!
//! Idempotency and races:
//! - An artifact is *up to date* when its last outcome event follows the last event that
//!   made it due; such a job does nothing. So redelivery, coalescing and a re-run from
//!   checkpoint 0 send nothing and append nothing.
//! - Command ids derive from (tenant, stream, artifact, version of the due-making event):
//!   a job repeated after a crash finds its earlier `RequestWriteBack`/outcome.
//! - Writes for one business key are serialized by a per-key async mutex (conditional
//!   create is not race-safe on real servers); different keys run concurrently, bounded.
//! - The checkpoint is a low watermark: it never passes an event whose job is unfinished.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chartline_domain::Aggregate;
use chartline_domain::compliance::{ComplianceMap, DataClass};
use chartline_domain::encounter::{Encounter, EncounterCommand, EncounterEvent, WriteBackArtifact};
use chartline_domain::patient::{IdentityStatus, Patient, PatientEvent};
use chartline_infra::EventStore;
use chartline_infra::checkpoint::{CHECKPOINT_CATEGORY, Checkpoint};
use chartline_infra::command::{CommandContext, execute_from};
use chartline_infra::store::{
    ReadScope, StoreError, Subscription, read_stream_tail, read_whole_stream,
};
use chartline_proto::codec::decode;
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, EventEnvelope, StreamId, TenantId};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedMutexGuard, Semaphore};
use uuid::Uuid;

use crate::client::{FhirClient, Written};
use crate::fhir::{
    EncounterRecord, artifact_name, artifacts_made_due, due_artifacts, resources_for,
};
use crate::stream_time::at_stream_time;

/// Builds a command for a given `at` (re-built when a newer fact forces a later time).
type MakeCommand = Box<dyn Fn(DateTime<Utc>) -> EncounterCommand + Send + Sync>;

/// Default checkpoint consumer name.
pub const REACTOR_NAME: &str = "ehr-connector";

/// Jobs in flight at once in `serve` (and the default of `chartline bench ehr`).
pub const DEFAULT_CONCURRENCY: usize = 16;

/// One artifact of one encounter to bring up to date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub tenant: TenantId,
    pub stream: StreamId,
    pub artifact: WriteBackArtifact,
    /// Set by an explicit replay (`retry_write_back`): bypasses the up-to-date check
    /// and derives its command ids from the replay's id.
    pub replay: Option<Replay>,
}

/// An explicit replay of one artifact, after a fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The replay's command ids derive from it: the same id again finds its earlier
    /// commands (idempotent); a new id writes again.
    pub id: Uuid,
    /// Who asked for it: its `WriteBackRequested` carries this actor (a person's retry
    /// is a manual touch); outcomes are still recorded by the connector.
    pub requested_by: Option<Actor>,
}

impl Replay {
    /// A fresh replay on the connector's own account.
    pub fn fresh() -> Replay {
        Replay {
            id: Uuid::now_v7(),
            requested_by: None,
        }
    }
}

/// What a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// The EHR acknowledged: `Type/id` and version.
    Acknowledged { resource: String, version: String },
    /// Recorded as failed (dead when not retryable).
    Failed {
        status: Option<u16>,
        message: String,
        retryable: bool,
    },
    /// Identity pending or in review: nothing sent, nothing recorded.
    Parked(IdentityStatus),
    /// The compliance map refused: the EHR is not covered for PHI now. Nothing sent;
    /// `PhiTransferBlocked` recorded (once per refusal).
    Blocked { component: String, reason: String },
    /// The last outcome already covers the latest change.
    UpToDate,
    /// Not due (the encounter has no such artifact yet).
    NotDue,
    /// The store or the command path refused; retried on the next trigger.
    Error(String),
}

/// Per-key async mutexes; an entry lives only while someone holds or waits for it.
#[derive(Default)]
pub(crate) struct KeyLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub(crate) struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyLocks {
    pub(crate) async fn lock(&self, key: String) -> KeyGuard<'_> {
        let mutex = {
            let mut map = self.map.lock().expect("key locks");
            map.entry(key.clone()).or_default().clone()
        };
        let guard = mutex.lock_owned().await;
        KeyGuard {
            locks: self,
            key,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().expect("key locks");
        self.guard.take();
        // Only the map holds it now: nobody waits, so forget the key.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

fn derived_id(parts: &[&str]) -> Uuid {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

pub(crate) struct Inner<S: EventStore> {
    pub(crate) store: S,
    pub(crate) client: FhirClient,
    pub(crate) locks: KeyLocks,
    pub(crate) name: String,
    pub(crate) compliance: Option<ComplianceGate>,
}

/// The compliance map and this EHR's component id in it: every write is checked
/// against the BAA coverage at the moment of sending (deny by default).
#[derive(Debug, Clone)]
pub struct ComplianceGate {
    pub map: Arc<ComplianceMap>,
    pub component: String,
}

/// The data class an artifact carries to the EHR (all PHI).
pub fn artifact_data_class(artifact: &WriteBackArtifact) -> DataClass {
    match artifact {
        WriteBackArtifact::Appointment | WriteBackArtifact::Encounter => DataClass::EncounterRecord,
        WriteBackArtifact::DocumentReference | WriteBackArtifact::Task { .. } => {
            DataClass::ClinicalDocumentation
        }
        WriteBackArtifact::ChargeItem => DataClass::Billing,
    }
}

/// The EHR connector for one EHR endpoint.
pub struct Connector<S: EventStore> {
    pub(crate) inner: Arc<Inner<S>>,
}

impl<S: EventStore> Clone for Connector<S> {
    fn clone(&self) -> Self {
        Connector {
            inner: self.inner.clone(),
        }
    }
}

fn artifact_matches(event: &EncounterEvent, artifact: &WriteBackArtifact) -> bool {
    artifacts_made_due(event).contains(artifact)
}

/// `(due, covered)` stream versions of one artifact: `due` is its last due-making event;
/// `covered` is the `WriteBackRequested` behind its last outcome. What that outcome
/// reports was mapped from the stream as it stood when the request was appended (see
/// [`Connector::process`]), so the artifact is up to date exactly when `covered > due`.
/// (Comparing with the outcome's own version is not enough: a due-making event that
/// lands between a job's read and its request would count as covered while the EHR
/// got the older content — found by reconciliation.)
pub(crate) fn write_back_versions(
    history: &[EventEnvelope],
    events: &[EncounterEvent],
    artifact: &WriteBackArtifact,
) -> (u64, u64) {
    let (mut due, mut requested, mut covered) = (0, 0, 0);
    for (envelope, event) in history.iter().zip(events) {
        if artifact_matches(event, artifact) {
            due = envelope.stream_version;
        }
        if let EncounterEvent::WriteBackRequested(e) = event
            && &e.artifact == artifact
        {
            requested = envelope.stream_version;
        } else if outcome_artifact(event) == Some(artifact) {
            covered = requested;
        }
    }
    (due, covered)
}

fn outcome_artifact(event: &EncounterEvent) -> Option<&WriteBackArtifact> {
    match event {
        EncounterEvent::WriteBackSucceeded(e) => Some(&e.artifact),
        EncounterEvent::WriteBackFailed(e) => Some(&e.artifact),
        _ => None,
    }
}

impl<S: EventStore> Connector<S> {
    pub fn new(store: S, client: FhirClient) -> Connector<S> {
        Connector::named(store, client, REACTOR_NAME)
    }

    /// A connector with its own checkpoint name (one per EHR endpoint).
    pub fn named(store: S, client: FhirClient, name: &str) -> Connector<S> {
        Connector {
            inner: Arc::new(Inner {
                store,
                client,
                locks: KeyLocks::default(),
                name: name.to_string(),
                compliance: None,
            }),
        }
    }

    /// Checks every write against the compliance map (`component` = this EHR's id in
    /// it). Call right after construction, before the connector is cloned or run.
    pub fn with_compliance(mut self, map: Arc<ComplianceMap>, component: &str) -> Connector<S> {
        Arc::get_mut(&mut self.inner)
            .expect("with_compliance is called before the connector is shared")
            .compliance = Some(ComplianceGate {
            map,
            component: component.to_string(),
        });
        self
    }

    /// The event store it reads and records outcomes in.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    pub fn client(&self) -> &FhirClient {
        &self.inner.client
    }

    pub(crate) async fn identity(
        &self,
        tenant: &TenantId,
        patient_id: Uuid,
    ) -> Result<IdentityStatus, StoreError> {
        let stream = StreamId::for_aggregate("patient", patient_id);
        let history = read_whole_stream(&self.inner.store, tenant, &stream).await?;
        let mut patient = Patient::default();
        for envelope in &history {
            if let Ok(event) = decode::<PatientEvent>(envelope) {
                patient.apply(&event);
            }
        }
        Ok(patient.status)
    }

    async fn load(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<(Vec<EventEnvelope>, Vec<EncounterEvent>), String> {
        let history = read_whole_stream(&self.inner.store, tenant, stream)
            .await
            .map_err(|e| e.to_string())?;
        let events = history
            .iter()
            .map(|e| decode::<EncounterEvent>(e).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((history, events))
    }

    /// Brings `cache` up to the stream's head, reading only what follows the versions
    /// it already holds (streams are append-only, so the result equals a whole read).
    async fn refresh(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        cache: &mut Loaded,
    ) -> Result<(), String> {
        let from = cache.history.last().map_or(1, |e| e.stream_version + 1);
        let tail = read_stream_tail(&self.inner.store, tenant, stream, from)
            .await
            .map_err(|e| e.to_string())?;
        for envelope in tail {
            let event = decode::<EncounterEvent>(&envelope).map_err(|e| e.to_string())?;
            cache.state.apply(&event);
            cache.history.push(envelope);
            cache.events.push(event);
        }
        Ok(())
    }

    /// Runs an encounter command from the stream as this task already holds it (`known`):
    /// only the tail after it is read (see `execute_from`).
    async fn command(
        &self,
        job: &Job,
        known: &Loaded,
        command_id: Uuid,
        correlation_id: Uuid,
        make: impl Fn(DateTime<Utc>) -> EncounterCommand,
        at: DateTime<Utc>,
    ) -> CommandReply {
        // A replay's request is on the account of whoever asked for it.
        let requester = match (&job.replay, make(at)) {
            (
                Some(Replay {
                    requested_by: Some(actor),
                    ..
                }),
                EncounterCommand::RequestWriteBack { .. },
            ) => Some(actor.clone()),
            _ => None,
        };
        let context = CommandContext {
            tenant: job.tenant.clone(),
            command_id,
            actor: requester
                .unwrap_or_else(|| Actor::new(ActorKind::Service, self.inner.name.clone())),
            correlation_id,
            source: "ehr-connector".into(),
        };
        // Our events carry the encounter's latest time (never later), so they cannot
        // push another system's facts into the past; if a newer fact lands meanwhile,
        // re-read it and try again.
        let (make, context) = (&make, &context);
        at_stream_time(
            at,
            5,
            |at| async move {
                execute_from::<Encounter, S>(
                    &self.inner.store,
                    &job.stream,
                    &make(at),
                    context,
                    &known.history,
                    known.state.clone(),
                )
                .await
            },
            || async {
                let (_, events) = self.load(&job.tenant, &job.stream).await?;
                Ok::<_, String>(events.iter().map(EncounterEvent::at).max())
            },
        )
        .await
    }

    /// Brings one artifact up to date in the EHR and records the outcome.
    pub async fn process(&self, job: &Job) -> JobOutcome {
        self.process_cached(job, &mut Loaded::default()).await
    }

    /// [`Connector::process`] with the stream as last read (brought up to date first).
    async fn process_cached(&self, job: &Job, cache: &mut Loaded) -> JobOutcome {
        let name = artifact_name(&job.artifact);
        let _key = self
            .inner
            .locks
            .lock(format!("{}/{}/{name}", job.tenant, job.stream))
            .await;
        if let Err(error) = self.refresh(&job.tenant, &job.stream, cache).await {
            *cache = Loaded::default();
            return JobOutcome::Error(error);
        }
        let (history, events) = (&cache.history, &cache.events);
        let (due_version, covered_version) = write_back_versions(history, events, &job.artifact);
        let mut record = EncounterRecord::from_events(job.tenant.as_str(), events);
        if due_version == 0 || !due_artifacts(&record.state).contains(&job.artifact) {
            return JobOutcome::NotDue;
        }
        if job.replay.is_none() && covered_version > due_version {
            return JobOutcome::UpToDate;
        }
        let Some(patient_id) = record.state.patient_id() else {
            return JobOutcome::NotDue;
        };
        let identity = match self.identity(&job.tenant, patient_id).await {
            Ok(identity) => identity,
            Err(error) => return JobOutcome::Error(error.to_string()),
        };
        if !identity.allows_chart_writes() {
            return JobOutcome::Parked(identity);
        }
        let replay = job
            .replay
            .as_ref()
            .map(|r| r.id.to_string())
            .unwrap_or_default();
        let ids = |step: &str| {
            derived_id(&[
                "ehr-connector",
                job.tenant.as_str(),
                job.stream.as_str(),
                &name,
                &due_version.to_string(),
                &replay,
                step,
            ])
        };
        let correlation = history
            .last()
            .map_or_else(Uuid::now_v7, |e| e.metadata.correlation_id);
        let at = record.state.last_event_at.unwrap_or_else(Utc::now);
        let artifact = job.artifact.clone();
        if let Some(gate) = &self.inner.compliance
            && let Err(blocked) =
                gate.map
                    .check(&gate.component, artifact_data_class(&artifact), Utc::now())
        {
            tracing::warn!(stream = %job.stream, artifact = %name, %blocked, "EHR write-back refused by the compliance map");
            let (component, reason) = (blocked.component.clone(), blocked.reason.to_string());
            let reply = self
                .command(
                    job,
                    cache,
                    ids("phi-transfer-blocked"),
                    correlation,
                    |at| EncounterCommand::RecordPhiTransferBlocked {
                        artifact: artifact.clone(),
                        component: component.clone(),
                        reason: reason.clone(),
                        checked_at: blocked.at,
                        at,
                    },
                    at,
                )
                .await;
            return match reply {
                CommandReply::Accepted { .. } => JobOutcome::Blocked { component, reason },
                CommandReply::Rejected { code, message } => JobOutcome::Error(format!(
                    "recording PhiTransferBlocked was rejected ({code:?}): {message}"
                )),
            };
        }
        let requested = self
            .command(
                job,
                cache,
                ids("request"),
                correlation,
                |at| EncounterCommand::RequestWriteBack {
                    artifact: artifact.clone(),
                    patient_identity: identity,
                    at,
                },
                at,
            )
            .await;
        let requested_version = match requested {
            CommandReply::Rejected { code, message } => {
                return JobOutcome::Error(format!(
                    "RequestWriteBack rejected ({code:?}): {message}"
                ));
            }
            CommandReply::Accepted { version, .. } => version,
        };
        // Map from the stream as it stood at the request: when anything landed between
        // our read and the request (or the request was an earlier attempt's), read again.
        let loaded_version = history.last().map_or(0, |e| e.stream_version);
        if requested_version != loaded_version + 1 {
            match self.refresh(&job.tenant, &job.stream, cache).await {
                Ok(()) => {
                    record = EncounterRecord::from_events(job.tenant.as_str(), &cache.events);
                }
                Err(error) => {
                    *cache = Loaded::default();
                    return JobOutcome::Error(error);
                }
            }
        }
        let mut first: Option<Written> = None;
        let mut failure = None;
        for resource in resources_for(&record, &job.artifact) {
            match self.inner.client.upsert(&resource).await {
                Ok(written) => {
                    first.get_or_insert(written);
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let (outcome, command): (JobOutcome, MakeCommand) = match (failure, first) {
            (None, Some(written)) => {
                let resource = format!("{}/{}", written.resource_type, written.id);
                let version = written.version.clone();
                let artifact = artifact.clone();
                (
                    JobOutcome::Acknowledged {
                        resource: resource.clone(),
                        version: version.clone(),
                    },
                    Box::new(move |at| EncounterCommand::RecordWriteBackSucceeded {
                        artifact: artifact.clone(),
                        ehr_resource_id: resource.clone(),
                        ehr_version: version.clone(),
                        at,
                    }),
                )
            }
            (failure, _) => {
                let failure = failure.unwrap_or(crate::client::WriteFailure {
                    status: None,
                    message: "the artifact maps to no resource".into(),
                    retryable: false,
                    attempts: 0,
                });
                let artifact = artifact.clone();
                let recorded = failure.clone();
                tracing::warn!(stream = %job.stream, artifact = %name, status = ?failure.status, message = %failure.message, retryable = failure.retryable, "EHR write-back failed");
                (
                    JobOutcome::Failed {
                        status: failure.status,
                        message: failure.message,
                        retryable: failure.retryable,
                    },
                    Box::new(move |at| EncounterCommand::RecordWriteBackFailed {
                        artifact: artifact.clone(),
                        status: recorded.status,
                        message: recorded.message.clone(),
                        retryable: recorded.retryable,
                        at,
                    }),
                )
            }
        };
        match self
            .command(job, cache, ids("outcome"), correlation, command, at)
            .await
        {
            CommandReply::Accepted { .. } => outcome,
            CommandReply::Rejected { code, message } => JobOutcome::Error(format!(
                "recording the outcome was rejected ({code:?}): {message}"
            )),
        }
    }

    /// Replays one artifact on behalf of `requested_by`, idempotently by `replay_id`
    /// (the `retry_write_back` command: the command id is the replay id).
    pub async fn retry_write_back_as(
        &self,
        tenant: &TenantId,
        encounter_id: Uuid,
        artifact: WriteBackArtifact,
        replay_id: Uuid,
        requested_by: Actor,
    ) -> JobOutcome {
        self.process(&Job {
            tenant: tenant.clone(),
            stream: StreamId::for_aggregate("encounter", encounter_id),
            artifact,
            replay: Some(Replay {
                id: replay_id,
                requested_by: Some(requested_by),
            }),
        })
        .await
    }

    /// Replays one artifact now (after a fix for a dead write-back), whatever its state.
    pub async fn retry_write_back(
        &self,
        tenant: &TenantId,
        encounter_id: Uuid,
        artifact: WriteBackArtifact,
    ) -> JobOutcome {
        self.process(&Job {
            tenant: tenant.clone(),
            stream: StreamId::for_aggregate("encounter", encounter_id),
            artifact,
            replay: Some(Replay::fresh()),
        })
        .await
    }

    /// Works through the artifacts queued for `first`'s stream, in order, one at a time
    /// (so this connector never races itself on the stream), until none is left.
    async fn process_stream(&self, first: &Job, queued: &StreamQueue) {
        let key = (first.tenant.clone(), first.stream.clone());
        let mut cache = Loaded::default();
        loop {
            let artifacts = {
                let mut map = queued.lock().expect("queued");
                match map.get_mut(&key) {
                    Some(artifacts) if !artifacts.is_empty() => std::mem::take(artifacts),
                    _ => {
                        map.remove(&key);
                        return;
                    }
                }
            };
            for artifact in artifacts {
                let job = Job {
                    artifact,
                    ..first.clone()
                };
                log_outcome(&job, &self.process_cached(&job, &mut cache).await);
            }
        }
    }

    /// Every artifact due for one encounter (after an identity resolution).
    async fn process_all_due(&self, tenant: &TenantId, stream: &StreamId) {
        if stream.category() == "rpm" {
            return self.process_all_observations_due(tenant, stream).await;
        }
        let Ok((_, events)) = self.load(tenant, stream).await else {
            return;
        };
        let record = EncounterRecord::from_events(tenant.as_str(), &events);
        for artifact in due_artifacts(&record.state) {
            let job = Job {
                tenant: tenant.clone(),
                stream: stream.clone(),
                artifact,
                replay: None,
            };
            log_outcome(&job, &self.process(&job).await);
        }
    }

    /// Runs until `shutdown` resolves: catch-up from the checkpoint, then live.
    pub async fn run(
        self,
        wake: Option<tokio::sync::watch::Receiver<u64>>,
        concurrency: usize,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), String> {
        let store = self.inner.store.clone();
        let checkpoint = Checkpoint::new(store.clone(), &self.inner.name);
        let start = checkpoint.load().await.map_err(|e| e.to_string())?;
        let mut index = PatientIndex::default();
        index
            .build(&store, start)
            .await
            .map_err(|e| e.to_string())?;
        let mut subscription = Subscription::new(store.clone(), ReadScope::AllTenants, start)
            .with_wake(wake)
            .with_poll_interval(Duration::from_millis(200));
        let limit = Arc::new(Semaphore::new(concurrency.max(1)));
        let in_flight: Arc<Mutex<BTreeMap<u64, usize>>> = Arc::default();
        // Artifacts waiting for their stream's running task (see `StreamQueue`).
        let queued: StreamQueue = Arc::default();
        let mut tasks = tokio::task::JoinSet::new();
        let mut saved = start;
        let mut dispatched = start;
        // Last dispatched event that is not a checkpoint: a quiet-time save only covers
        // real work, so checkpoint events (ours or another reactor's) never trigger saves.
        let mut last_work = start;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            while tasks.try_join_next().is_some() {}
            let event: EventEnvelope = tokio::select! {
                // `next` is cancel-safe (it only changes state after a read completes).
                _ = tick.tick() => {
                    // Stream tasks outlive the dispatch of their stream's last event:
                    // once they finish in a quiet log, let the checkpoint catch up.
                    let safe = low_watermark(&in_flight, dispatched).min(last_work);
                    if safe > saved && save_checkpoint(&checkpoint, safe).await? {
                        saved = safe;
                    }
                    continue;
                }
                event = subscription.next() => match event {
                    Ok(event) => event,
                    Err(error) if error.is_retryable() => {
                        tracing::warn!(%error, "ehr connector: store unavailable; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(error) => return Err(error.to_string()),
                },
                _ = &mut shutdown => break,
            };
            let position = event.global_position;
            if event.category() != CHECKPOINT_CATEGORY {
                last_work = position;
            }
            for work in self.work_for(&event, &mut index) {
                // One task per encounter stream: while it runs, a new trigger for that
                // stream joins its queue instead of taking a permit of its own. The
                // task's own (older) position stays in flight until the queue is empty,
                // so the low watermark never passes the coalesced event.
                if let Work::Job(job) = &work {
                    let mut map = queued.lock().expect("queued");
                    if let Some(artifacts) = map.get_mut(&(job.tenant.clone(), job.stream.clone()))
                    {
                        if !artifacts.contains(&job.artifact) {
                            artifacts.push(job.artifact.clone());
                        }
                        continue;
                    }
                }
                let permit = limit.clone().acquire_owned().await.expect("semaphore open");
                *in_flight
                    .lock()
                    .expect("in flight")
                    .entry(position)
                    .or_default() += 1;
                if let Work::Job(job) = &work {
                    queued.lock().expect("queued").insert(
                        (job.tenant.clone(), job.stream.clone()),
                        vec![job.artifact.clone()],
                    );
                }
                let (connector, in_flight) = (self.clone(), in_flight.clone());
                let queued = queued.clone();
                tasks.spawn(async move {
                    match work {
                        Work::Job(job) => connector.process_stream(&job, &queued).await,
                        Work::AllDue(tenant, stream) => {
                            connector.process_all_due(&tenant, &stream).await
                        }
                        Work::Observations(job) => {
                            let outcome = connector.process_observations(&job).await;
                            crate::rpm_writeback::log_observation_outcome(&job, &outcome)
                        }
                    }
                    let mut map = in_flight.lock().expect("in flight");
                    if let Some(count) = map.get_mut(&position) {
                        *count -= 1;
                        if *count == 0 {
                            map.remove(&position);
                        }
                    }
                    drop(permit);
                });
            }
            dispatched = position;
            let safe = low_watermark(&in_flight, dispatched);
            if safe >= saved + 200 && save_checkpoint(&checkpoint, safe).await? {
                saved = safe;
            }
        }
        // Drain what is in flight (bounded), then save how far everything got.
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        let safe = low_watermark(&in_flight, dispatched);
        if safe > saved {
            let _ = checkpoint.save(safe).await;
        }
        Ok(())
    }

    fn work_for(&self, event: &EventEnvelope, index: &mut PatientIndex) -> Vec<Work> {
        let tenant = &event.metadata.tenant;
        match event.category() {
            CHECKPOINT_CATEGORY => vec![],
            "encounter" => {
                let Ok(decoded) = decode::<EncounterEvent>(event) else {
                    return vec![];
                };
                if let EncounterEvent::Scheduled(scheduled) = &decoded {
                    index.add(tenant, scheduled.patient_id, &event.stream_id);
                }
                artifacts_made_due(&decoded)
                    .into_iter()
                    .map(|artifact| {
                        Work::Job(Job {
                            tenant: tenant.clone(),
                            stream: event.stream_id.clone(),
                            artifact,
                            replay: None,
                        })
                    })
                    .collect()
            }
            "rpm" => match decode::<chartline_domain::rpm::RpmEvent>(event) {
                Ok(chartline_domain::rpm::RpmEvent::Enrolled { patient_id, .. }) => {
                    index.add(tenant, patient_id, &event.stream_id);
                    vec![]
                }
                Ok(chartline_domain::rpm::RpmEvent::ReadingsRecorded { batch_id, .. }) => {
                    vec![Work::Observations(crate::rpm_writeback::ObservationJob {
                        tenant: tenant.clone(),
                        stream: event.stream_id.clone(),
                        batch_id,
                        replay: None,
                    })]
                }
                _ => vec![],
            },
            "patient"
                if matches!(
                    event.event_type.as_str(),
                    "IdentifierLinked" | "MatchResolved" | "NewPatientConfirmed"
                ) =>
            {
                let Ok(patient_id) = event.stream_id.id_part().parse::<Uuid>() else {
                    return vec![];
                };
                index
                    .encounters(tenant, patient_id)
                    .map(|stream| Work::AllDue(tenant.clone(), stream.clone()))
                    .collect()
            }
            _ => vec![],
        }
    }
}

/// An encounter stream as far as it was read: envelopes, decoded events, and the
/// aggregate folded from them (kept up to date by `refresh`, so a command starts from it).
#[derive(Default)]
struct Loaded {
    history: Vec<EventEnvelope>,
    events: Vec<EncounterEvent>,
    state: Encounter,
}

/// Per (tenant, stream) with a running job task: the artifacts triggered since it last
/// looked. An entry exists exactly while its task runs.
type StreamQueue = Arc<Mutex<HashMap<(TenantId, StreamId), Vec<WriteBackArtifact>>>>;

enum Work {
    Job(Job),
    /// Everything due on an encounter or RPM enrolment stream.
    AllDue(TenantId, StreamId),
    Observations(crate::rpm_writeback::ObservationJob),
}

fn low_watermark(in_flight: &Mutex<BTreeMap<u64, usize>>, dispatched: u64) -> u64 {
    in_flight
        .lock()
        .expect("in flight")
        .keys()
        .next()
        .map_or(dispatched, |oldest| oldest - 1)
}

fn log_outcome(job: &Job, outcome: &JobOutcome) {
    let artifact = artifact_name(&job.artifact);
    match outcome {
        JobOutcome::Error(error) => {
            tracing::warn!(stream = %job.stream, %artifact, %error, "ehr write-back job failed")
        }
        JobOutcome::Parked(identity) => {
            tracing::info!(stream = %job.stream, %artifact, ?identity, "write-back waits for identity resolution")
        }
        other => tracing::debug!(stream = %job.stream, %artifact, ?other, "ehr write-back job"),
    }
}

/// Patient → encounter and RPM enrolment streams, so an identity resolution can release
/// what it blocked, also for streams begun before the checkpoint (one scan at start).
#[derive(Default)]
struct PatientIndex {
    encounters: HashMap<(TenantId, Uuid), BTreeSet<StreamId>>,
}

impl PatientIndex {
    fn add(&mut self, tenant: &TenantId, patient_id: Uuid, stream: &StreamId) {
        self.encounters
            .entry((tenant.clone(), patient_id))
            .or_default()
            .insert(stream.clone());
    }

    fn encounters(&self, tenant: &TenantId, patient_id: Uuid) -> impl Iterator<Item = &StreamId> {
        self.encounters
            .get(&(tenant.clone(), patient_id))
            .into_iter()
            .flatten()
    }

    async fn build<S: EventStore>(&mut self, store: &S, up_to: u64) -> Result<(), StoreError> {
        let mut after = 0;
        while after < up_to {
            let page = store.read_all(&ReadScope::AllTenants, after, 5_000).await?;
            let Some(last) = page.last() else { break };
            after = last.global_position;
            for event in page.iter().filter(|e| e.global_position <= up_to) {
                let patient_id = match (event.category(), event.event_type.as_str()) {
                    ("encounter", "Scheduled") => match decode::<EncounterEvent>(event) {
                        Ok(EncounterEvent::Scheduled(scheduled)) => scheduled.patient_id,
                        _ => continue,
                    },
                    ("rpm", "Enrolled") => match decode::<chartline_domain::rpm::RpmEvent>(event) {
                        Ok(chartline_domain::rpm::RpmEvent::Enrolled { patient_id, .. }) => {
                            patient_id
                        }
                        _ => continue,
                    },
                    _ => continue,
                };
                self.add(&event.metadata.tenant, patient_id, &event.stream_id);
            }
        }
        Ok(())
    }
}

/// Every RPM reading of a patient (all enrolments in the tenant) as vital-signs
/// Observations, in log order (for `chartline fhir export --patient ID --rpm`).
pub async fn patient_rpm_observations<S: EventStore>(
    store: &S,
    tenant: &TenantId,
    patient_id: Uuid,
) -> Result<Vec<serde_json::Value>, String> {
    use chartline_domain::rpm::RpmEvent;
    let scope = ReadScope::Tenant(tenant.clone());
    let mut enrolments = BTreeSet::new();
    let mut observations = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .read_all(&scope, after, 5_000)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        for event in page.iter().filter(|e| e.category() == "rpm") {
            match decode::<RpmEvent>(event).map_err(|e| e.to_string())? {
                RpmEvent::Enrolled {
                    patient_id: enrolled,
                    ..
                } if enrolled == patient_id => {
                    enrolments.insert(event.stream_id.clone());
                }
                RpmEvent::ReadingsRecorded {
                    batch_id, readings, ..
                } if enrolments.contains(&event.stream_id) => {
                    observations.extend(crate::fhir::observations_for(
                        tenant.as_str(),
                        patient_id,
                        batch_id,
                        &readings,
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(observations)
}

/// Saves the checkpoint; `Ok(false)` when the store is unavailable for now (a NATS or
/// database restart): the connector keeps running and saves on a later tick, since a
/// checkpoint that lags only means redelivered events, which are up to date.
async fn save_checkpoint<S: EventStore>(
    checkpoint: &Checkpoint<S>,
    position: u64,
) -> Result<bool, String> {
    match checkpoint.save(position).await {
        Ok(()) => Ok(true),
        Err(error) if error.is_retryable() => {
            tracing::warn!(%error, position, "ehr connector: checkpoint not saved (store unavailable); retrying later");
            Ok(false)
        }
        Err(error) => Err(error.to_string()),
    }
}
