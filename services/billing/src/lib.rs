//! Billing service: manual coding commands (`assign_codes`, `release_charge`) on
//! `chartline.cmd.<tenant>.billing.<command>`, and the billing reactor.
//!
//! The reactor follows the global log from a durable checkpoint. When a note is signed
//! it evaluates the encounter under the billing policy as known today and records the
//! decision (codes + policy version + rule trace, or a hold with reasons) through the
//! same command path as any client. When a new policy version is recorded on
//! `policy-billing`, it re-evaluates every coded encounter whose charge is not yet
//! released; a changed decision becomes `CodesRevised`, never an edit. Redelivery is
//! harmless: command ids are derived from the triggering event, so a replayed trigger
//! finds its earlier result.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use chartline_domain::Aggregate;
use chartline_domain::billing::{PolicyChange, PolicyHistory, Scenario, evaluate};
use chartline_domain::encounter::{Encounter, EncounterCommand, Modality};
use chartline_infra::EventStore;
use chartline_infra::bus::{Bus, BusError};
use chartline_infra::checkpoint::{CHECKPOINT_CATEGORY, Checkpoint, system_tenant};
use chartline_infra::command::{
    CommandContext, ServiceSpec, derived_uuid, execute, serve_commands,
};
use chartline_infra::store::{
    Direction, ExpectedVersion, ReadScope, StoreError, Subscription, read_whole_stream,
};
use chartline_proto::codec::decode;
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, EventEnvelope, Metadata, NewEvent, StreamId, TenantId};
use uuid::Uuid;

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "billing",
    commands: &["assign_codes", "release_charge"],
    target_field: "encounter_id",
};

/// Stream of the billing policy versions (system tenant).
pub const POLICY_STREAM: &str = "policy-billing";
/// Name of the reactor's checkpoint stream.
pub const REACTOR_NAME: &str = "billing-reactor";

/// Serves the manual billing commands until `shutdown` resolves.
pub async fn run_commands<S: EventStore>(
    bus: Bus,
    store: S,
    root: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), BusError> {
    serve_commands::<Encounter, S>(SPEC, bus, store, root, shutdown).await
}

fn policy_stream() -> StreamId {
    StreamId::parse(POLICY_STREAM).expect("static stream id")
}

/// Records the shipped policy versions on `policy-billing` (idempotent: each version's
/// event id is derived from its number, so re-publishing stores nothing new).
pub async fn publish_policy<S: EventStore>(
    store: &S,
    changes: &[PolicyChange],
) -> Result<(), StoreError> {
    let tenant = system_tenant();
    store.ensure_tenant(&tenant).await?;
    let stream = policy_stream();
    for change in changes {
        let event = NewEvent {
            event_id: derived_uuid(&["policy-version", &change.version.to_string()]),
            event_type: "PolicyVersionRecorded".into(),
            schema_version: 1,
            data: serde_json::to_value(change).expect("policy changes serialize"),
            metadata: Metadata {
                tenant: tenant.clone(),
                actor: Actor::new(ActorKind::System, "policy-loader"),
                correlation_id: derived_uuid(&["policy-load"]),
                causation_id: None,
                source: "billing".into(),
                occurred_at: change
                    .recorded_at
                    .and_hms_opt(0, 0, 0)
                    .expect("midnight exists")
                    .and_utc(),
                contains_phi: false,
            },
        };
        store
            .append(&tenant, &stream, ExpectedVersion::Any, vec![event])
            .await?;
    }
    Ok(())
}

/// The policy history exactly as recorded on `policy-billing`.
pub async fn load_policy<S: EventStore>(store: &S) -> Result<PolicyHistory, String> {
    let events = read_whole_stream(store, &system_tenant(), &policy_stream())
        .await
        .map_err(|e| e.to_string())?;
    let changes = events
        .iter()
        .map(|e| serde_json::from_value::<PolicyChange>(e.data.clone()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    PolicyHistory::from_changes(changes).map_err(|e| e.to_string())
}

/// Evaluates one encounter and records the decision. `trigger` names the event that
/// caused the evaluation; the command id derives from it (idempotent on redelivery).
pub async fn code_encounter<S: EventStore>(
    store: &S,
    tenant: &TenantId,
    encounter_stream: &StreamId,
    policy: &PolicyHistory,
    trigger: Uuid,
    trigger_at: chrono::DateTime<chrono::Utc>,
    known_at: chrono::DateTime<chrono::Utc>,
) -> Result<CommandReply, String> {
    let history = read_whole_stream(store, tenant, encounter_stream)
        .await
        .map_err(|e| e.to_string())?;
    let mut encounter = Encounter::default();
    for envelope in &history {
        let event = decode(envelope).map_err(|e| e.to_string())?;
        encounter.apply(&event);
    }
    if encounter.charge_released {
        return Err(format!("{encounter_stream}: charge already released"));
    }
    // Audio-only means the patient could not or would not use video (CMS modifier 93
    // covers both); the consultation service records the reason on ModalityChanged.
    let declined_video = encounter
        .consultation_ended
        .as_ref()
        .is_some_and(|ended| ended.modality_used == Modality::AudioOnly);
    let scenario =
        Scenario::from_encounter(&encounter, declined_video).map_err(|e| e.to_string())?;
    let decision = evaluate(&scenario, policy, known_at.date_naive()).map_err(|e| e.to_string())?;
    let command: EncounterCommand =
        // Recorded at the time of the triggering fact (never before the encounter's last
        // event), so replaying a day gives the same stream.
        decision.assign_codes_command(
            encounter
                .last_event_at
                .map_or(trigger_at, |last| last.max(trigger_at)),
        );
    let context = CommandContext {
        tenant: tenant.clone(),
        command_id: derived_uuid(&[
            "billing-reactor",
            &trigger.to_string(),
            encounter_stream.as_str(),
        ]),
        actor: Actor::new(ActorKind::Service, "billing-reactor"),
        correlation_id: history
            .last()
            .map_or(trigger, |e| e.metadata.correlation_id),
        source: "billing".into(),
    };
    Ok(execute::<Encounter, S>(store, encounter_stream, &command, &context).await)
}

/// Encounters whose codes are assigned and not released (to re-evaluate on a new policy).
async fn unreleased_coded_encounters<S: EventStore>(
    store: &S,
    up_to: u64,
) -> Result<BTreeSet<(TenantId, StreamId)>, StoreError> {
    let mut open = BTreeSet::new();
    let mut after = 0;
    while after < up_to {
        let page = store.read_all(&ReadScope::AllTenants, after, 5_000).await?;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        for event in page
            .iter()
            .filter(|e| e.category() == "encounter" && e.global_position <= up_to)
        {
            let key = (event.metadata.tenant.clone(), event.stream_id.clone());
            match event.event_type.as_str() {
                "CodesAssigned" | "CodesRevised" => {
                    open.insert(key);
                }
                "ChargeReleased" => {
                    open.remove(&key);
                }
                _ => {}
            }
        }
    }
    Ok(open)
}

/// Runs the billing reactor until `shutdown` resolves.
pub async fn run_reactor<S: EventStore>(
    store: S,
    wake: Option<tokio::sync::watch::Receiver<u64>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let checkpoint = Checkpoint::new(store.clone(), REACTOR_NAME);
    let start = checkpoint.load().await.map_err(|e| e.to_string())?;
    let mut policy = load_policy(&store).await?;
    let mut subscription = Subscription::new(store.clone(), ReadScope::AllTenants, start)
        .with_wake(wake)
        .with_poll_interval(Duration::from_millis(200));
    let mut saved = start;
    tokio::pin!(shutdown);
    loop {
        let event: EventEnvelope = tokio::select! {
            event = subscription.next() => match event {
                Ok(event) => event,
                Err(error) if error.is_retryable() => {
                    tracing::warn!(%error, "billing reactor: store unavailable; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(error) => return Err(error.to_string()),
            },
            _ = &mut shutdown => break,
        };
        react(&store, &mut policy, &event).await;
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

/// Catches up to the current head once (tests, `demo`), then returns the position.
pub async fn catch_up<S: EventStore>(store: &S) -> Result<u64, String> {
    let checkpoint = Checkpoint::new(store.clone(), REACTOR_NAME);
    let start = checkpoint.load().await.map_err(|e| e.to_string())?;
    let mut policy = load_policy(store).await?;
    let mut subscription = Subscription::new(store.clone(), ReadScope::AllTenants, start);
    loop {
        let page = subscription.next_batch().await.map_err(|e| e.to_string())?;
        if page.is_empty() {
            break;
        }
        for event in &page {
            react(store, &mut policy, event).await;
        }
    }
    let position = subscription.position();
    if position > start {
        checkpoint.save(position).await.map_err(|e| e.to_string())?;
    }
    Ok(position)
}

async fn react<S: EventStore>(store: &S, policy: &mut PolicyHistory, event: &EventEnvelope) {
    if event.category() == CHECKPOINT_CATEGORY {
        return;
    }
    let now = chrono::Utc::now();
    match (event.category(), event.event_type.as_str()) {
        ("encounter", "NoteSigned") => {
            match code_encounter(
                store,
                &event.metadata.tenant,
                &event.stream_id,
                policy,
                event.event_id,
                event.metadata.occurred_at,
                now,
            )
            .await
            {
                Ok(CommandReply::Rejected { code, message }) => {
                    tracing::warn!(stream = %event.stream_id, ?code, %message, "coding rejected");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(stream = %event.stream_id, %error, "coding failed"),
            }
        }
        ("policy", "PolicyVersionRecorded") => {
            match load_policy(store).await {
                Ok(latest) => *policy = latest,
                Err(error) => {
                    tracing::error!(%error, "billing policy unreadable; keeping the previous one");
                    return;
                }
            }
            let open = match unreleased_coded_encounters(store, event.global_position).await {
                Ok(open) => open,
                Err(error) => {
                    tracing::error!(%error, "cannot list unreleased claims for re-evaluation");
                    return;
                }
            };
            for (tenant, stream) in open {
                if let Err(error) = code_encounter(
                    store,
                    &tenant,
                    &stream,
                    policy,
                    event.event_id,
                    event.metadata.occurred_at,
                    now,
                )
                .await
                {
                    tracing::warn!(%stream, %error, "re-evaluation failed");
                }
            }
        }
        _ => {}
    }
}

/// The recorded decisions of an encounter, newest last (for `billing explain`).
pub async fn recorded_decisions<S: EventStore>(
    store: &S,
    tenant: &TenantId,
    encounter: &StreamId,
) -> Result<Vec<EventEnvelope>, StoreError> {
    let events = store
        .read_stream(tenant, encounter, 1, Direction::Forwards, 10_000)
        .await?;
    Ok(events
        .into_iter()
        .filter(|e| {
            matches!(
                e.event_type.as_str(),
                "CodesAssigned" | "CodesRevised" | "ChargeReleased"
            )
        })
        .collect())
}
