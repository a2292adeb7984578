//! Synthetic workload and the rebuild benchmark.
//!
//! [`synthetic_journeys`] makes realistic, fully synthetic patient journeys (patient
//! registration and identity, telehealth encounters through write-back and charge
//! release, RPM enrollments with daily blood-pressure readings and management time),
//! deterministic for a given index. [`append_synthetic`] writes them through the real
//! store; [`rebuild_benchmark`] measures how fast every read model is built from
//! position 0 (`chartline bench` calls it; see docs/projections.md).

use std::time::Instant;

use chartline_domain::encounter::{
    AppointmentType, AssignedCode, ChargeReleased, CheckedIn, CodesAssigned, CodingOutcome,
    ConsultationEnded, ConsultationStarted, EncounterEvent, FollowUpTaskCreated, Modality,
    NoteAuthor, NoteDrafted, NoteSigned, NoteType, PatientLocation, PatientStatus, Payer,
    Scheduled, ServiceKind, Site, SoapSections, VisitType, WriteBackArtifact, WriteBackFailed,
    WriteBackRequested, WriteBackSucceeded,
};
use chartline_domain::patient::{
    Demographics, Identifier, MatchCandidate, MatchGrade, MatchResolution, PatientEvent, Sex,
};
use chartline_domain::rpm::{Reading, RpmEvent};
use chartline_infra::{AnyStore, EventStore, ExpectedVersion};
use chartline_proto::codec::{DomainEvent, encode};
use chartline_proto::{Actor, ActorKind, Metadata, NewEvent, StreamId, TenantId};
use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use futures::StreamExt;
use serde::Serialize;
use uuid::Uuid;

use crate::db::ReadDb;
use crate::engine::{ProjectionRunner, RunnerConfig};
use crate::error::ProjectionError;

/// Builds a [`NewEvent`] from a domain event, the way services do.
pub fn new_event<E: DomainEvent>(tenant: &TenantId, actor: Actor, event: &E) -> NewEvent {
    let encoded = encode(event);
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: encoded.event_type.to_string(),
        schema_version: encoded.schema_version,
        data: encoded.data,
        metadata: Metadata {
            tenant: tenant.clone(),
            actor,
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            source: "synthetic".into(),
            occurred_at: Utc::now(),
            contains_phi: encoded.contains_phi,
        },
    }
}

/// A stream and the events to append to it (in order, in one append).
pub struct Journey {
    pub tenant: TenantId,
    pub stream: StreamId,
    pub events: Vec<NewEvent>,
}

fn uuid_for(kind: u64, index: u64) -> Uuid {
    Uuid::from_u64_pair(0x0192_0000_0000_7000 | kind, index)
}

fn service() -> Actor {
    Actor::new(ActorKind::Service, "synthetic-service")
}

/// The journeys of synthetic patient `index`: patient stream, one encounter, and for
/// every third patient an RPM enrollment. About 45 events per patient on average.
pub fn synthetic_journeys(tenant: &TenantId, index: u64) -> Vec<Journey> {
    let base = Utc.with_ymd_and_hms(2026, 1, 5, 14, 0, 0).unwrap()
        + Duration::minutes(index as i64 % 50_000);
    let patient_id = uuid_for(1, index);
    let encounter_id = uuid_for(2, index);
    let practitioner = format!("dr-{}", index % 97);
    let mut journeys = Vec::new();

    let mut patient = vec![new_event(
        tenant,
        service(),
        &PatientEvent::Registered {
            patient_id,
            demographics: Demographics {
                given_name: format!("Given{index}"),
                family_name: format!("Synthetic{}", index % 1_000),
                birth_date: NaiveDate::from_ymd_opt(
                    1950 + (index % 50) as i32,
                    1 + (index % 12) as u32,
                    1 + (index % 28) as u32,
                )
                .unwrap(),
                sex: if index.is_multiple_of(2) {
                    Sex::Female
                } else {
                    Sex::Male
                },
                address_line: None,
                city: None,
                state: None,
                postal_code: None,
                phone: None,
                email: None,
                time_zone: Some("America/New_York".into()),
            },
            at: base - Duration::days(10),
        },
    )];
    let identifier = Identifier {
        system: "urn:synthetic:mrn".into(),
        value: format!("MRN{index:08}"),
    };
    if index.is_multiple_of(10) {
        patient.push(new_event(
            tenant,
            service(),
            &PatientEvent::MatchReviewRequested {
                candidates: vec![MatchCandidate {
                    candidate_patient_id: Some(uuid_for(9, index)),
                    identifier: Some(identifier.clone()),
                    score: 0.82,
                    grade: MatchGrade::Probable,
                }],
                at: base - Duration::days(9),
            },
        ));
        patient.push(new_event(
            tenant,
            Actor::new(ActorKind::Staff, "registrar-1"),
            &PatientEvent::MatchResolved {
                resolution: MatchResolution::ConfirmLink { identifier },
                reviewer_id: "registrar-1".into(),
                at: base - Duration::days(8),
            },
        ));
    } else {
        patient.push(new_event(
            tenant,
            service(),
            &PatientEvent::IdentifierLinked {
                identifier,
                match_score: Some(0.99),
                at: base - Duration::days(9),
            },
        ));
    }
    journeys.push(Journey {
        tenant: tenant.clone(),
        stream: StreamId::for_aggregate("patient", patient_id),
        events: patient,
    });

    let minutes = |m: i64| base + Duration::minutes(m);
    let mut encounter: Vec<NewEvent> = Vec::new();
    let mut push =
        |actor: Actor, event: EncounterEvent| encounter.push(new_event(tenant, actor, &event));
    let clinician = Actor::new(ActorKind::Clinician, practitioner.clone());
    push(
        Actor::new(ActorKind::Staff, "scheduler-1"),
        EncounterEvent::Scheduled(Scheduled {
            encounter_id,
            patient_id,
            practitioner_id: practitioner.clone(),
            visit_type: VisitType {
                service: ServiceKind::EMVisit,
                patient_status: PatientStatus::Established,
                level: Some(3),
                appointment_type: AppointmentType::Followup,
            },
            planned_modality: Modality::Video,
            window_start: minutes(0),
            window_end: minutes(30),
            patient_location: PatientLocation::Home,
            payer: Payer::Medicare,
            site: Site::PhysicianOffice,
            at: base - Duration::days(3),
        }),
    );
    push(
        service(),
        EncounterEvent::CheckedIn(CheckedIn { at: minutes(-5) }),
    );
    push(
        clinician.clone(),
        EncounterEvent::ConsultationStarted(ConsultationStarted {
            modality: Modality::Video,
            at: minutes(0),
        }),
    );
    push(
        clinician.clone(),
        EncounterEvent::ConsultationEnded(ConsultationEnded {
            duration_seconds: 1_200,
            video_seconds: 1_200,
            audio_only_seconds: 0,
            modality_used: Modality::Video,
            at: minutes(20),
        }),
    );
    let note_actor = if index.is_multiple_of(13) {
        Actor::new(ActorKind::Staff, "ma-1")
    } else {
        Actor::new(ActorKind::Ai, "scribe-1")
    };
    push(
        note_actor,
        EncounterEvent::NoteDrafted(NoteDrafted {
            author: NoteAuthor::AiScribe {
                vendor: "synthetic".into(),
                model_id: "scribe-1".into(),
            },
            note_type: NoteType::ProgressNote,
            sections: SoapSections {
                subjective: "Synthetic follow-up.".into(),
                objective: "Stable.".into(),
                assessment: "Hypertension, controlled.".into(),
                plan: "Continue.".into(),
            },
            at: minutes(25),
        }),
    );
    push(
        clinician.clone(),
        EncounterEvent::NoteSigned(NoteSigned {
            practitioner_id: practitioner.clone(),
            ai_assisted: true,
            at: minutes(40),
        }),
    );
    let code_actor = if index.is_multiple_of(7) {
        Actor::new(ActorKind::Staff, "coder-1")
    } else {
        service()
    };
    let codes = vec![AssignedCode {
        code: "99213".into(),
        modifiers: vec![],
        pos: "10".into(),
        units: 1,
    }];
    push(
        code_actor,
        EncounterEvent::CodesAssigned(CodesAssigned {
            outcome: CodingOutcome::Billable {
                codes: codes.clone(),
            },
            policy_version: 1,
            rule_trace: vec!["em-established".into()],
            at: minutes(41),
        }),
    );
    let task_id = uuid_for(3, index);
    push(
        clinician.clone(),
        EncounterEvent::FollowUpTaskCreated(FollowUpTaskCreated {
            task_id,
            description: "Recheck in 3 months".into(),
            owner: practitioner.clone(),
            due: minutes(60 * 24 * 90),
            at: minutes(42),
        }),
    );
    let artifacts = [
        WriteBackArtifact::Appointment,
        WriteBackArtifact::Encounter,
        WriteBackArtifact::DocumentReference,
        WriteBackArtifact::Task { task_id },
        WriteBackArtifact::ChargeItem,
    ];
    for (n, artifact) in artifacts.iter().enumerate() {
        let t = 45 + n as i64 * 2;
        push(
            service(),
            EncounterEvent::WriteBackRequested(WriteBackRequested {
                artifact: artifact.clone(),
                at: minutes(t),
            }),
        );
        if index.is_multiple_of(5) && n == 2 {
            push(
                service(),
                EncounterEvent::WriteBackFailed(WriteBackFailed {
                    artifact: artifact.clone(),
                    status: Some(503),
                    message: "EHR unavailable".into(),
                    retryable: true,
                    attempt: 1,
                    at: minutes(t),
                }),
            );
            push(
                Actor::new(ActorKind::Staff, "ops-1"),
                EncounterEvent::WriteBackRequested(WriteBackRequested {
                    artifact: artifact.clone(),
                    at: minutes(t + 1),
                }),
            );
        }
        push(
            service(),
            EncounterEvent::WriteBackSucceeded(WriteBackSucceeded {
                artifact: artifact.clone(),
                ehr_resource_id: format!("ehr-{index}-{n}"),
                ehr_version: "1".into(),
                at: minutes(t + 1),
            }),
        );
    }
    push(
        service(),
        EncounterEvent::ChargeReleased(ChargeReleased {
            codes,
            policy_version: 1,
            at: minutes(60),
        }),
    );
    journeys.push(Journey {
        tenant: tenant.clone(),
        stream: StreamId::for_aggregate("encounter", encounter_id),
        events: encounter,
    });

    if index.is_multiple_of(3) {
        let enrollment_id = uuid_for(4, index);
        let start = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        let device = Actor::new(ActorKind::Device, format!("cuff-{index}"));
        let mut rpm = vec![new_event(
            tenant,
            service(),
            &RpmEvent::Enrolled {
                enrollment_id,
                patient_id,
                device_id: format!("cuff-{index}"),
                period_start: start,
                time_zone: "America/New_York".into(),
                thresholds: vec![],
                at: Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap(),
            },
        )];
        let days = 10 + (index % 21) as i64;
        for day in 0..days {
            let at = Utc.with_ymd_and_hms(2026, 1, 1, 13, 0, 0).unwrap() + Duration::days(day);
            rpm.push(new_event(
                tenant,
                device.clone(),
                &RpmEvent::ReadingsRecorded {
                    batch_id: Uuid::from_u64_pair(index, day as u64),
                    readings: vec![
                        reading("8480-6", 120.0 + (day % 15) as f64, "mm[Hg]", at, index),
                        reading("8462-4", 75.0 + (day % 9) as f64, "mm[Hg]", at, index),
                    ],
                    at,
                },
            ));
        }
        for n in 0..2 {
            rpm.push(new_event(
                tenant,
                Actor::new(ActorKind::Clinician, practitioner.clone()),
                &RpmEvent::ManagementTimeLogged {
                    clinician_id: practitioner.clone(),
                    minutes: 12,
                    interactive_communication: n == 1,
                    at: Utc.with_ymd_and_hms(2026, 1, 20 + n, 15, 0, 0).unwrap(),
                },
            ));
        }
        journeys.push(Journey {
            tenant: tenant.clone(),
            stream: StreamId::for_aggregate("rpm", enrollment_id),
            events: rpm,
        });
    }
    journeys
}

fn reading(code: &str, value: f64, unit: &str, at: DateTime<Utc>, index: u64) -> Reading {
    Reading {
        code: code.into(),
        value,
        unit: unit.into(),
        effective_at: at,
        device_id: format!("cuff-{index}"),
    }
}

/// Appends synthetic journeys until at least `events` events were written; returns the
/// number written. Streams are appended concurrently (the store groups commits).
pub async fn append_synthetic(
    store: &AnyStore,
    first_index: u64,
    events: u64,
) -> Result<u64, ProjectionError> {
    let tenant = TenantId::parse("default").expect("valid tenant");
    let mut written = 0u64;
    let mut index = first_index;
    while written < events {
        let mut batch = Vec::new();
        let mut planned = 0u64;
        while written + planned < events && batch.len() < 2_000 {
            for journey in synthetic_journeys(&tenant, index) {
                planned += journey.events.len() as u64;
                batch.push(journey);
            }
            index += 1;
        }
        let results: Vec<Result<_, _>> = futures::stream::iter(batch.into_iter().map(|journey| {
            let store = store.clone();
            async move {
                store
                    .append(
                        &journey.tenant,
                        &journey.stream,
                        ExpectedVersion::NoStream,
                        journey.events,
                    )
                    .await
            }
        }))
        .buffer_unordered(64)
        .collect()
        .await;
        for result in results {
            let appended = result?;
            written += appended.last_version;
        }
    }
    Ok(written)
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub events: u64,
    pub seconds: f64,
    /// Log events per second, each applied by all six read models.
    pub events_per_sec: f64,
    /// Resident memory sampled every 100 ms during the rebuild.
    pub rss: RssReport,
}

/// Resident set size of this process (`VmRSS` of /proc/self/status), in bytes.
pub fn vm_rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|kib| kib * 1024)
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub fn vm_hwm_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|kib| kib * 1024)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
}

/// What the RSS sampler saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RssReport {
    /// `(seconds since start, bytes)` every 100 ms.
    pub samples: Vec<(f64, u64)>,
    pub peak_bytes: u64,
    pub first_half_peak_bytes: u64,
    pub second_half_peak_bytes: u64,
    /// Peak of the second half minus peak of the first half (≤ 0: flat).
    pub growth_bytes: i64,
}

/// Samples `VmRSS` on its own thread until [`RssSampler::finish`].
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(f64, u64)>>,
}

impl RssSampler {
    pub fn start(every: std::time::Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(rss) = vm_rss_bytes() {
                    samples.push((started.elapsed().as_secs_f64(), rss));
                }
                std::thread::sleep(every);
            }
            if let Some(rss) = vm_rss_bytes() {
                samples.push((started.elapsed().as_secs_f64(), rss));
            }
            samples
        });
        RssSampler { stop, handle }
    }

    pub fn finish(self) -> RssReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.handle.join().unwrap_or_default();
        let half = samples.len() / 2;
        let peak = |s: &[(f64, u64)]| s.iter().map(|(_, b)| *b).max().unwrap_or(0);
        let first = peak(&samples[..half]);
        let second = peak(&samples[half..]);
        RssReport {
            peak_bytes: peak(&samples),
            first_half_peak_bytes: first,
            second_half_peak_bytes: second,
            growth_bytes: if half == 0 {
                0
            } else {
                second as i64 - first as i64
            },
            samples,
        }
    }
}

/// Builds every standard read model from position 0 into `read_db` (which must hold
/// no projection state yet) and reports the rate: the work of a full rebuild of all
/// read models, reading the log once. RSS is sampled every 100 ms meanwhile.
pub async fn rebuild_benchmark(
    store: AnyStore,
    read_db: ReadDb,
) -> Result<BenchReport, ProjectionError> {
    let backend = read_db.backend().as_str().to_string();
    let mut runner = ProjectionRunner::with_projections(
        store,
        read_db,
        crate::models::standard_projections(),
        RunnerConfig {
            batch_size: 10_000,
            ..RunnerConfig::default()
        },
    )
    .await?;
    let sampler = RssSampler::start(std::time::Duration::from_millis(100));
    let started = Instant::now();
    let report = runner.catch_up().await;
    let seconds = started.elapsed().as_secs_f64();
    let rss = sampler.finish();
    let report = report?;
    Ok(BenchReport {
        backend,
        events: report.events,
        seconds,
        events_per_sec: report.events as f64 / seconds.max(1e-9),
        rss,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct LiveLagReport {
    pub backend: String,
    /// Events appended during the paced run.
    pub events: u64,
    pub seconds: f64,
    /// Achieved append rate.
    pub events_per_sec: f64,
    /// Lag of each event: from its append's acknowledgement (the commit) to the moment
    /// every projection's committed checkpoint covered it.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Follows the log live with all six read models (caught up first) while `lanes`
/// writers append single synthetic events at `rate` events/s in total for `seconds`;
/// measures per-event lag (append acknowledged → every projection's checkpoint
/// committed past it).
pub async fn live_lag_benchmark(
    store: AnyStore,
    read_db: ReadDb,
    rate: f64,
    seconds: f64,
) -> Result<LiveLagReport, ProjectionError> {
    use std::sync::{Arc, Mutex};
    let backend = read_db.backend().as_str().to_string();
    let mut runner = ProjectionRunner::with_projections(
        store.clone(),
        read_db,
        crate::models::standard_projections(),
        RunnerConfig::default(),
    )
    .await?;
    runner.catch_up().await?;
    let mut checkpoints = runner.checkpoint_watch();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let follower = tokio::spawn(async move {
        runner
            .run_until(async {
                let _ = stop_rx.await;
            })
            .await
    });
    // When (Instant) the lowest checkpoint reached each value.
    let seen: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let collector = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while checkpoints.changed().await.is_ok() {
                let position = *checkpoints.borrow_and_update();
                seen.lock().expect("lock").push((position, Instant::now()));
            }
        })
    };

    let tenant = TenantId::parse("default").expect("valid tenant");
    let lanes = 5usize;
    let period = std::time::Duration::from_secs_f64(lanes as f64 / rate.max(1.0));
    let per_lane = ((rate * seconds) / lanes as f64).ceil() as usize;
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let store = store.clone();
        let tenant = tenant.clone();
        writers.spawn(async move {
            let mut acked: Vec<(u64, Instant)> = Vec::with_capacity(per_lane);
            let mut index = 50_000_000 + lane as u64 * 1_000_000;
            let mut queue: std::collections::VecDeque<(StreamId, NewEvent)> = Default::default();
            let mut ticks = tokio::time::interval(period);
            while acked.len() < per_lane {
                if queue.is_empty() {
                    for journey in synthetic_journeys(&tenant, index) {
                        for event in journey.events {
                            queue.push_back((journey.stream.clone(), event));
                        }
                    }
                    index += 1;
                }
                ticks.tick().await;
                let (stream, event) = queue.pop_front().expect("filled above");
                let appended = store
                    .append(&tenant, &stream, ExpectedVersion::Any, vec![event])
                    .await?;
                acked.push((appended.last_position, Instant::now()));
            }
            Ok::<_, ProjectionError>(acked)
        });
    }
    let mut acked = Vec::new();
    while let Some(result) = writers.join_next().await {
        let lane = result.map_err(|e| ProjectionError::Config(format!("writer failed: {e}")))??;
        acked.extend(lane);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let last = acked.iter().map(|(p, _)| *p).max().unwrap_or(0);
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while seen.lock().expect("lock").last().map_or(0, |(p, _)| *p) < last
        && Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(());
    follower
        .await
        .map_err(|e| ProjectionError::Config(format!("follower failed: {e}")))??;
    collector.abort();
    let seen = seen.lock().expect("lock").clone();
    let mut lags: Vec<f64> = acked
        .iter()
        .map(|(position, at)| {
            let index = seen.partition_point(|(p, _)| p < position);
            match seen.get(index) {
                Some((_, covered)) => covered.saturating_duration_since(*at).as_secs_f64() * 1e3,
                None => f64::INFINITY,
            }
        })
        .collect();
    lags.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        lags.get(((lags.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(LiveLagReport {
        backend,
        events: acked.len() as u64,
        seconds: elapsed,
        events_per_sec: acked.len() as f64 / elapsed.max(1e-9),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        max_ms: lags.last().copied().unwrap_or(0.0),
    })
}
