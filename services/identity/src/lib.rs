//! Identity service: patient registration and identity resolution. Nothing reaches an
//! EHR chart while a patient is pending or under review (the encounter write-back gate).
//! Commands on `chartline.cmd.<tenant>.identity.<command>`.
//!
//! The identity reactor resolves every new registration: it matches the registered
//! demographics against the tenant's known patients (Fellegi–Sunter, see
//! `chartline_domain::identity`) and records the outcome through the command path:
//! - exactly one **certain** candidate with an EHR identifier → `IdentifierLinked`
//!   (the candidate's MRN, with the score);
//! - a certain candidate without an identifier (the same person registered twice in
//!   Chartline) → `MatchReviewRequested`: merging records is a human decision;
//! - probable / possible candidates, or several certain ones → `MatchReviewRequested`
//!   with the scored candidates; a human resolves it with `resolve_match` or `merge`;
//! - nothing at possible or above → `NewPatientConfirmed`.
//!
//! Command ids derive from the `Registered` event, so redelivery changes nothing.
//!
//! Each tenant's patients sit in a [`LiveMatcher`], built once from the log at start and
//! then updated per event (a registration is inserted after it is matched, a linked
//! identifier replaces the record, a merged chart leaves it), instead of a
//! `MatchIndex` rebuilt per registration (O(n) each; it fell behind at ~1,300
//! patients, `docs/soak.md`). The model is re-fitted at fit points fixed by counts, so
//! a restart that replays the log decides exactly as before the restart.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use chartline_domain::identity::{
    LiveMatcher, MatchConfig, MatchOutcome, PatientRecord, RefitPolicy, decide_outcome,
};
use chartline_domain::patient::{
    Demographics, Identifier, MatchCandidate, Patient, PatientCommand, PatientEvent,
};
use chartline_infra::EventStore;
use chartline_infra::bus::{Bus, BusError};
use chartline_infra::checkpoint::{CHECKPOINT_CATEGORY, Checkpoint};
use chartline_infra::command::{
    CommandContext, ServiceSpec, derived_uuid, execute, serve_commands,
};
use chartline_infra::store::{ReadScope, Subscription};
use chartline_proto::codec::decode;
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, EventEnvelope, StreamId, TenantId};
use uuid::Uuid;

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "identity",
    commands: &[
        "register",
        "link_identifier",
        "request_match_review",
        "resolve_match",
        "confirm_new_patient",
        "merge",
    ],
    target_field: "patient_id",
};

/// Name of the reactor's checkpoint stream.
pub const REACTOR_NAME: &str = "identity-reactor";

/// Serves the commands until `shutdown` resolves; drains in-flight commands.
pub async fn run<S: EventStore>(
    bus: Bus,
    store: S,
    root: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), BusError> {
    serve_commands::<Patient, S>(SPEC, bus, store, root, shutdown).await
}

/// What the reactor knows of one patient.
#[derive(Debug, Clone)]
struct Known {
    demographics: Demographics,
    identifiers: Vec<Identifier>,
    merged: bool,
}

/// One tenant: what the reactor knows of each patient, and the matcher over the
/// patients that are not merged.
struct TenantPatients {
    known: BTreeMap<Uuid, Known>,
    matcher: LiveMatcher,
}

impl Default for TenantPatients {
    fn default() -> Self {
        TenantPatients {
            known: BTreeMap::new(),
            matcher: LiveMatcher::new(MatchConfig::default(), RefitPolicy::default()),
        }
    }
}

impl TenantPatients {
    fn record(&self, patient: Uuid) -> Option<PatientRecord> {
        let known = self.known.get(&patient)?;
        Some(PatientRecord::from_demographics(
            patient.to_string(),
            &known.demographics,
            known.identifiers.clone(),
        ))
    }
}

/// A registration the reactor has to decide.
struct Registration {
    tenant: TenantId,
    patient: Uuid,
    command: Result<PatientCommand, String>,
}

/// The tenants' patients, folded from the global log.
#[derive(Default)]
pub struct Registry {
    tenants: BTreeMap<TenantId, TenantPatients>,
}

impl Registry {
    /// Folds one event. A registration is matched against the tenant's other patients
    /// only when `decide` (a replay at start-up just indexes it; both take the same
    /// steps, so the matcher reaches the same state either way).
    fn observe(&mut self, envelope: &EventEnvelope, decide: bool) -> Option<Registration> {
        let patient = Uuid::parse_str(envelope.stream_id.id_part()).ok()?;
        let event: PatientEvent = decode(envelope).ok()?;
        let tenant = envelope.metadata.tenant.clone();
        let patients = self.tenants.entry(tenant.clone()).or_default();
        match event {
            PatientEvent::Registered { demographics, .. } => {
                // Matched without identifiers: an EHR identifier arrives by link.
                let incoming =
                    PatientRecord::from_demographics(patient.to_string(), &demographics, vec![]);
                patients.known.insert(
                    patient,
                    Known {
                        demographics,
                        identifiers: vec![],
                        merged: false,
                    },
                );
                let at = envelope.metadata.occurred_at;
                if !decide {
                    if let Err(error) = patients.matcher.observe_registration(incoming) {
                        tracing::warn!(%patient, %error, "identity: cannot index the patient");
                    }
                    return None;
                }
                let command = patients
                    .matcher
                    .resolve_registration(incoming)
                    .map_err(|error| error.to_string())
                    .map(|candidates| patients.command_for(candidates, at));
                return Some(Registration {
                    tenant,
                    patient,
                    command,
                });
            }
            PatientEvent::IdentifierLinked { identifier, .. }
            | PatientEvent::MatchResolved {
                resolution: chartline_domain::patient::MatchResolution::ConfirmLink { identifier },
                ..
            } => {
                if let Some(known) = patients.known.get_mut(&patient)
                    && !known.identifiers.contains(&identifier)
                {
                    known.identifiers.push(identifier);
                    let merged = known.merged;
                    if !merged
                        && let Some(record) = patients.record(patient)
                        && let Err(error) = patients.matcher.upsert(record)
                    {
                        tracing::warn!(%patient, %error, "identity: cannot index the patient");
                    }
                }
            }
            PatientEvent::Merged { .. } => {
                if let Some(known) = patients.known.get_mut(&patient) {
                    known.merged = true;
                    patients.matcher.remove(&patient.to_string());
                }
            }
            _ => {}
        }
        None
    }
}

impl TenantPatients {
    /// The command for a registration's scored candidates (see the module doc).
    fn command_for(
        &self,
        candidates: Vec<chartline_domain::identity::ScoredCandidate>,
        at: chrono::DateTime<chrono::Utc>,
    ) -> PatientCommand {
        let patients = &self.known;
        let candidate_of = |record_id: &str| -> (Option<Uuid>, Option<Identifier>) {
            let id = Uuid::parse_str(record_id).ok();
            let identifier = id
                .and_then(|id| patients.get(&id))
                .and_then(|known| known.identifiers.first().cloned());
            (id, identifier)
        };
        let review =
            |candidates: Vec<MatchCandidate>| PatientCommand::RequestMatchReview { candidates, at };
        match decide_outcome(candidates) {
            MatchOutcome::New => PatientCommand::ConfirmNewPatient { at },
            MatchOutcome::Link(candidate) => {
                let (id, identifier) = candidate_of(&candidate.record_id);
                match identifier {
                    Some(identifier) => PatientCommand::LinkIdentifier {
                        identifier,
                        match_score: Some(candidate.score.clamp(0.0, 1.0)),
                        at,
                    },
                    None => review(vec![candidate.to_match_candidate(id, None)]),
                }
            }
            MatchOutcome::Review(candidates) => review(
                candidates
                    .iter()
                    .take(5)
                    .map(|c| {
                        let (id, identifier) = candidate_of(&c.record_id);
                        c.to_match_candidate(id, identifier)
                    })
                    .collect(),
            ),
        }
    }
}

/// Applies one event to the registry and resolves a fresh registration.
pub async fn react<S: EventStore>(store: &S, registry: &mut Registry, event: &EventEnvelope) {
    if event.category() != "patient" {
        return;
    }
    let Some(Registration {
        tenant,
        patient,
        command,
    }) = registry.observe(event, true)
    else {
        return;
    };
    // Only a registration still pending needs resolving (a replay after restart finds
    // it already resolved: the command id makes the retry a no-op anyway).
    // Recorded at the time of the registration it resolves: a replay gives the same stream.
    let command = match command {
        Ok(command) => command,
        Err(error) => {
            tracing::warn!(%patient, %error, "identity matching failed; leaving the patient pending");
            return;
        }
    };
    let context = CommandContext {
        tenant,
        command_id: derived_uuid(&[REACTOR_NAME, &event.event_id.to_string()]),
        actor: Actor::new(ActorKind::Service, "identity-matcher"),
        correlation_id: event.metadata.correlation_id,
        source: "identity".into(),
    };
    let stream = StreamId::for_aggregate("patient", patient);
    if let CommandReply::Rejected { code, message } =
        execute::<Patient, S>(store, &stream, &command, &context).await
    {
        tracing::info!(%patient, ?code, %message, "identity outcome not recorded");
    }
}

/// Runs the identity reactor until `shutdown` resolves. The registry is rebuilt from the
/// whole log at start (patients are few compared to events); the checkpoint only
/// decides from where registrations are resolved again.
pub async fn run_reactor<S: EventStore>(
    store: S,
    wake: Option<tokio::sync::watch::Receiver<u64>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let checkpoint = Checkpoint::new(store.clone(), REACTOR_NAME);
    let start = checkpoint.load().await.map_err(|e| e.to_string())?;
    let mut registry = Registry::default();
    let mut warm = Subscription::new(store.clone(), ReadScope::AllTenants, 0).with_page_size(5_000);
    while warm.position() < start {
        let page = warm.next_batch().await.map_err(|e| e.to_string())?;
        if page.is_empty() {
            break;
        }
        for event in page
            .iter()
            .filter(|e| e.global_position <= start && e.category() == "patient")
        {
            registry.observe(event, false);
        }
    }
    let mut subscription = Subscription::new(store.clone(), ReadScope::AllTenants, start)
        .with_wake(wake)
        .with_poll_interval(Duration::from_millis(200));
    let mut saved = start;
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            event = subscription.next() => match event {
                Ok(event) => event,
                Err(error) if error.is_retryable() => {
                    tracing::warn!(%error, "identity reactor: store unavailable; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(error) => return Err(error.to_string()),
            },
            _ = &mut shutdown => break,
        };
        if event.category() != CHECKPOINT_CATEGORY {
            react(&store, &mut registry, &event).await;
        }
        if event.global_position >= saved + 100 {
            checkpoint
                .save(event.global_position)
                .await
                .map_err(|e| e.to_string())?;
            saved = event.global_position;
        }
    }
    if subscription.position() > saved {
        let _ = checkpoint.save(subscription.position()).await;
    }
    Ok(())
}
