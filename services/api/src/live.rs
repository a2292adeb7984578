//! Live updates for subscriptions, published only once the read models have them.
//!
//! One tail of the global log per API instance feeds every subscriber (a broadcast
//! channel: fan-out costs one clone of an `Arc` per subscriber, not one store read).
//! Before an event is published the tail waits until every running projection's
//! checkpoint has reached the event's position, so a client that re-queries a view
//! after a notification sees the change (DESIGN.md "API": "an event fires only after the
//! projection that serves the view has committed it"). Projections whose status is
//! `stopped` (a poison event under the stop policy) are not waited for: they are visible
//! as stopped in `projectionStatus`, and one stuck model must not silence every other
//! subscription. Without a read-model database nothing serves views, and events are
//! published once the store has committed them.
//!
//! What depends on the read models is computed once per event here, not once per
//! subscriber: the tenant's billing-queue counts after a billing-relevant event, and the
//! patient of an RPM alert. Projection status is polled once a second while anybody
//! subscribes to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chartline_infra::EventStore;
use chartline_infra::store::{AnyStore, Direction, ReadScope, StoreError, Subscription};
use chartline_projections::db::{Cell, Kind, ReadDb};
use chartline_projections::engine::ProjectionStatus;
use chartline_proto::EventEnvelope;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

/// Event types that change `billing_queue` rows (see projections' `billing_queue`).
pub const BILLING_EVENT_TYPES: &[&str] = &[
    "Scheduled",
    "Cancelled",
    "NoShow",
    "ConsultationEnded",
    "NoteSigned",
    "CodesAssigned",
    "CodesRevised",
    "ChargeReleased",
    "Registered",
    "IdentifierLinked",
    "MatchReviewRequested",
    "MatchResolved",
    "NewPatientConfirmed",
    "Merged",
    "Enrolled",
    "ReadingsRecorded",
    "ManagementTimeLogged",
];

/// Event types that mean a write-back did not reach the EHR.
pub const WRITE_BACK_PROBLEM_TYPES: &[&str] = &["WriteBackFailed", "PhiTransferBlocked"];

/// How often the gate re-reads projection checkpoints while it waits.
const GATE_POLL: Duration = Duration::from_millis(5);
/// How often projection status is refreshed for `projectionStatus` subscribers.
const STATUS_POLL: Duration = Duration::from_secs(1);

/// One committed event, with what subscribers need that depends on the read models.
#[derive(Debug)]
pub struct LiveUpdate {
    pub event: EventEnvelope,
    /// The tenant's billing queue `(status, count)` after this event (billing-relevant
    /// events only, and only with a read-model database).
    pub billing_counts: Option<Vec<(String, i64)>>,
    /// The patient of an RPM enrolment stream's event (`ThresholdBreached`).
    pub rpm_patient: Option<Uuid>,
}

/// Shared by the schema: subscribe here.
pub struct Live {
    pub updates: broadcast::Sender<Arc<LiveUpdate>>,
    pub status: watch::Sender<Arc<Vec<ProjectionStatus>>>,
    /// Events published so far, and how long the newest waited for the read models.
    pub published: AtomicU64,
    pub gate_wait_micros: AtomicU64,
}

impl Live {
    pub fn new() -> Arc<Live> {
        let (updates, _) = broadcast::channel(4_096);
        let (status, _) = watch::channel(Arc::new(Vec::new()));
        Arc::new(Live {
            updates,
            status,
            published: AtomicU64::new(0),
            gate_wait_micros: AtomicU64::new(0),
        })
    }

    /// Starts the tail (from the store's current head) and the status poller.
    pub async fn start(
        self: &Arc<Live>,
        store: AnyStore,
        read_db: Option<ReadDb>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, StoreError> {
        let head = store.head_position().await?;
        let tail = tokio::spawn(tail(self.clone(), store.clone(), read_db.clone(), head));
        let mut handles = vec![tail];
        if let Some(db) = read_db {
            handles.push(tokio::spawn(poll_status(self.clone(), store, db)));
        }
        Ok(handles)
    }
}

async fn tail(live: Arc<Live>, store: AnyStore, read_db: Option<ReadDb>, head: u64) {
    let wake = store.head_watch();
    let mut subscription = Subscription::new(store.clone(), ReadScope::AllTenants, head)
        .with_wake(wake)
        .with_poll_interval(Duration::from_millis(100));
    let mut gate = Gate::default();
    let mut patients: HashMap<String, Uuid> = HashMap::new();
    loop {
        let event = match subscription.next().await {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "API event tail: store unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let started = std::time::Instant::now();
        if let Some(db) = &read_db {
            gate.wait_for(db, event.global_position).await;
        }
        let billing_counts = match &read_db {
            Some(db) if BILLING_EVENT_TYPES.contains(&event.event_type.as_str()) => {
                billing_counts(db, event.metadata.tenant.as_str()).await
            }
            _ => None,
        };
        let rpm_patient = if event.event_type == "ThresholdBreached" {
            rpm_patient(&store, &mut patients, &event).await
        } else {
            None
        };
        live.gate_wait_micros
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        live.published.fetch_add(1, Ordering::Relaxed);
        // No subscriber is not an error.
        let _ = live.updates.send(Arc::new(LiveUpdate {
            event,
            billing_counts,
            rpm_patient,
        }));
    }
}

/// The low watermark of the running projections' checkpoints.
#[derive(Default)]
struct Gate {
    watermark: Option<u64>,
}

impl Gate {
    /// Returns once every projection that is not stopped has committed `position`.
    async fn wait_for(&mut self, db: &ReadDb, position: u64) {
        let mut warned = false;
        let started = std::time::Instant::now();
        loop {
            if self.watermark.is_some_and(|w| w >= position) {
                return;
            }
            match watermark(db).await {
                Ok(None) => return, // no projection registered: nothing serves views yet
                Ok(Some(w)) => {
                    self.watermark = Some(w);
                    if w >= position {
                        return;
                    }
                }
                Err(error) => tracing::warn!(%error, "live gate: read-model database unavailable"),
            }
            if !warned && started.elapsed() > Duration::from_secs(10) {
                warned = true;
                tracing::warn!(
                    position,
                    "live updates are waiting for projections to catch up (see projectionStatus)"
                );
            }
            tokio::time::sleep(GATE_POLL).await;
        }
    }
}

async fn watermark(db: &ReadDb) -> Result<Option<u64>, chartline_projections::ProjectionError> {
    let rows = db
        .fetch(
            "SELECT MIN(position), COUNT(*) FROM projection_state WHERE status <> 'stopped'",
            &[],
            &[Kind::Int, Kind::Int],
        )
        .await?;
    Ok(match rows.first().map(|r| (&r[0], &r[1])) {
        Some((Cell::Int(min), Cell::Int(count))) if *count > 0 => Some((*min).max(0) as u64),
        _ => None,
    })
}

/// The tenant's billing queue by status; `None` when the read models are unreachable.
pub async fn billing_counts(db: &ReadDb, tenant: &str) -> Option<Vec<(String, i64)>> {
    let rows = db
        .fetch(
            "SELECT status, COUNT(*) FROM billing_queue WHERE tenant = ? GROUP BY status ORDER BY status",
            &[Cell::Text(tenant.to_string())],
            &[Kind::Text, Kind::Int],
        )
        .await
        .inspect_err(|error| tracing::warn!(%error, "live: billing counts unavailable"))
        .ok()?;
    Some(
        rows.into_iter()
            .filter_map(|row| match (&row[0], &row[1]) {
                (Cell::Text(status), Cell::Int(count)) => Some((status.clone(), *count)),
                _ => None,
            })
            .collect(),
    )
}

/// The patient of an RPM enrolment stream: its first event (`Enrolled`) names it.
async fn rpm_patient(
    store: &AnyStore,
    cache: &mut HashMap<String, Uuid>,
    event: &EventEnvelope,
) -> Option<Uuid> {
    let key = format!("{}/{}", event.metadata.tenant, event.stream_id);
    if let Some(patient) = cache.get(&key) {
        return Some(*patient);
    }
    let first = store
        .read_stream(
            &event.metadata.tenant,
            &event.stream_id,
            0,
            Direction::Forwards,
            1,
        )
        .await
        .ok()?;
    let patient = first
        .first()?
        .data
        .get("patient_id")?
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())?;
    if cache.len() > 100_000 {
        cache.clear();
    }
    cache.insert(key, patient);
    Some(patient)
}

async fn poll_status(live: Arc<Live>, store: AnyStore, db: ReadDb) {
    loop {
        if live.status.receiver_count() > 0 {
            match chartline_projections::engine::status(&store, &db).await {
                Ok(status) => {
                    live.status.send_if_modified(|current| {
                        let changed = current.len() != status.len()
                            || current.iter().zip(&status).any(|(a, b)| {
                                (a.checkpoint, a.head, &a.status, a.dead_letters_open)
                                    != (b.checkpoint, b.head, &b.status, b.dead_letters_open)
                            });
                        if changed {
                            *current = Arc::new(status);
                        }
                        changed
                    });
                }
                Err(error) => tracing::warn!(%error, "live: projection status unavailable"),
            }
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
}
