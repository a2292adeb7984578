//! The encounter lifecycle through the real command path, embedded.

use std::collections::BTreeSet;
use std::time::Duration;

use chartline::scenario::{self, Visit};
use chartline::serve_cmd::{self, Runtime, ServeArgs};
use chartline_infra::EventStore;
use chartline_infra::store::read_whole_stream;
use chartline_proto::commands::{CommandReply, RejectionCode};
use chartline_proto::{EventEnvelope, StreamId, TenantId};
use chrono::{TimeZone, Utc};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

struct Embedded {
    runtime: Runtime,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<(String, anyhow::Result<()>)>,
    dir: std::path::PathBuf,
}

impl Embedded {
    async fn start() -> Embedded {
        let dir = std::env::temp_dir().join(format!("chartline_t_{}", Uuid::new_v4().simple()));
        let args = ServeArgs::embedded(&["default", "clinic-a"]);
        let selected = args.selected().unwrap();
        let url = format!("sqlite://{}/events.db", dir.display());
        let runtime = serve_cmd::connect(&args, &url, &selected).await.unwrap();
        let (stop, stopped) = watch::channel(false);
        let tasks = serve_cmd::start(&args, &runtime, &selected, &stopped)
            .await
            .unwrap();
        Embedded {
            runtime,
            stop,
            tasks,
            dir,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while let Some(done) = self.tasks.join_next().await {
            let (name, result) = done.unwrap();
            assert!(result.is_ok(), "{name} failed: {:?}", result.err());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn tenant() -> TenantId {
    TenantId::parse("clinic-a").unwrap()
}

pub fn reference_visit(audio_fallback: bool) -> Visit {
    Visit {
        encounter_id: Uuid::now_v7(),
        patient_id: Uuid::now_v7(),
        practitioner_id: "dr-synthetic-1".into(),
        start: Utc.with_ymd_and_hms(2026, 3, 2, 15, 0, 0).unwrap(),
        audio_fallback,
        ai_drafted: true,
        level: 3,
        new_patient: false,
        payer: "medicare",
        at_home: true,
    }
}

async fn wait_for_event(
    store: &impl EventStore,
    stream: &StreamId,
    event_type: &str,
) -> Vec<EventEnvelope> {
    for _ in 0..200 {
        let events = read_whole_stream(store, &tenant(), stream).await.unwrap();
        if events.iter().any(|e| e.event_type == event_type) {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{event_type} never appeared on {stream}");
}

fn assert_accepted(reply: &CommandReply, what: &str) {
    assert!(
        matches!(reply, CommandReply::Accepted { .. }),
        "{what}: {reply:?}"
    );
}

/// Runs the full lifecycle; returns the encounter's events.
pub async fn run_lifecycle(runtime: &Runtime, visit: &Visit) -> Vec<EventEnvelope> {
    for step in scenario::steps_until_signed(visit) {
        let reply = scenario::send(&runtime.bus, &runtime.root, &tenant(), &step).await;
        assert_accepted(&reply, step.command);
    }
    let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
    wait_for_event(&runtime.store, &stream, "CodesAssigned").await;
    for step in scenario::steps_after_coding(visit) {
        let reply = scenario::send(&runtime.bus, &runtime.root, &tenant(), &step).await;
        assert_accepted(&reply, step.command);
    }
    read_whole_stream(&runtime.store, &tenant(), &stream)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_visit_with_audio_fallback_completes_itself_in_the_record() {
    let app = Embedded::start().await;
    let visit = reference_visit(true);
    let events = run_lifecycle(&app.runtime, &visit).await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "Scheduled",
            "CheckedIn",
            "ConsultationStarted",
            "ModalityChanged",
            "ConsultationEnded",
            "NoteDrafted",
            "NoteSigned",
            "CodesAssigned",
            "FollowUpTaskCreated"
        ]
    );
    // 4 minutes of video, 15 audio-only: billed audio-only under Medicare 2026 (modifier 93, POS 10).
    let ended = &events[4].data;
    assert_eq!(ended["modality_used"], "audio_only");
    let codes = &events[7];
    assert_eq!(
        codes.data["outcome"]["outcome"], "billable",
        "{}",
        codes.data
    );
    assert_eq!(
        codes.data["outcome"]["codes"],
        json!([{"code": "99213", "modifiers": ["93"], "pos": "10", "units": 1}])
    );
    assert!(codes.data["policy_version"].as_u64().unwrap() >= 9);
    assert!(!codes.data["rule_trace"].as_array().unwrap().is_empty());
    assert_eq!(codes.metadata.actor.id, "billing-reactor");
    // Correlation flows from the first command to every event; causation names the command.
    let signed = &events[6];
    assert_eq!(
        codes.metadata.correlation_id,
        signed.metadata.correlation_id
    );
    assert!(events.iter().all(|e| e.metadata.causation_id.is_some()));
    // AI-drafted, clinician-signed.
    assert_eq!(
        events[5].metadata.actor.kind,
        chartline_proto::ActorKind::Ai
    );
    assert_eq!(events[6].data["ai_assisted"], true);
    assert!(
        app.runtime
            .store
            .verify_all(&chartline_infra::ReadScope::AllTenants)
            .await
            .unwrap()
            .is_intact()
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_a_command_returns_the_same_reply_and_appends_nothing() {
    let app = Embedded::start().await;
    let visit = reference_visit(false);
    let steps = scenario::steps_until_signed(&visit);
    let first = scenario::send(&app.runtime.bus, &app.runtime.root, &tenant(), &steps[0]).await;
    let again = scenario::send(&app.runtime.bus, &app.runtime.root, &tenant(), &steps[0]).await;
    assert_accepted(&first, "schedule");
    assert_eq!(first, again);
    let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
    assert_eq!(
        read_whole_stream(&app.runtime.store, &tenant(), &stream)
            .await
            .unwrap()
            .len(),
        1
    );
    // Concurrent duplicates of the next command: one effect.
    let clinic = tenant();
    let (a, b) = tokio::join!(
        scenario::send(&app.runtime.bus, &app.runtime.root, &clinic, &steps[1]),
        scenario::send(&app.runtime.bus, &app.runtime.root, &clinic, &steps[1]),
    );
    assert_accepted(&a, "check_in");
    assert_eq!(a, b);
    assert_eq!(
        read_whole_stream(&app.runtime.store, &tenant(), &stream)
            .await
            .unwrap()
            .len(),
        2
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_get_typed_rejections_and_append_nothing() {
    let app = Embedded::start().await;
    let visit = reference_visit(false);
    let steps = scenario::steps_until_signed(&visit);
    for step in &steps[..3] {
        assert_accepted(
            &scenario::send(&app.runtime.bus, &app.runtime.root, &tenant(), step).await,
            step.command,
        );
    }
    let before = app.runtime.store.stats().await.unwrap().events;
    let bus = &app.runtime.bus;
    let timeout = Duration::from_secs(5);
    let raw = |subject: &str, body: &[u8]| {
        let (subject, body) = (subject.to_string(), body.to_vec());
        async move {
            let reply = bus.request(&subject, body, timeout).await.unwrap();
            serde_json::from_slice::<CommandReply>(&reply).unwrap()
        }
    };
    let code = |reply: CommandReply| match reply {
        CommandReply::Rejected { code, .. } => code,
        accepted => panic!("accepted: {accepted:?}"),
    };
    let e = visit.encounter_id;
    let envelope = |payload: serde_json::Value| {
        serde_json::to_vec(&json!({
            "command_id": Uuid::now_v7(),
            "actor": {"kind": "staff", "id": "tester"},
            "payload": payload,
        }))
        .unwrap()
    };
    // Malformed JSON.
    assert_eq!(
        code(raw("chartline.cmd.clinic-a.scheduling.check_in", b"{not json").await),
        RejectionCode::Validation
    );
    // Unknown command.
    assert_eq!(
        code(
            raw(
                "chartline.cmd.clinic-a.scheduling.teleport",
                &envelope(json!({"encounter_id": e}))
            )
            .await
        ),
        RejectionCode::UnknownCommand
    );
    // Schema-invalid body: wrong type / missing field / unknown field.
    assert_eq!(
        code(raw("chartline.cmd.clinic-a.consultation.change_modality", &envelope(json!({"encounter_id": e, "to": "hologram", "reason": "x", "at": "2026-03-02T15:05:00Z"}))).await),
        RejectionCode::Validation
    );
    assert_eq!(
        code(
            raw(
                "chartline.cmd.clinic-a.consultation.end_consultation",
                &envelope(json!({"encounter_id": "not-a-uuid"}))
            )
            .await
        ),
        RejectionCode::Validation
    );
    // Wrong (unknown) tenant.
    assert_eq!(
        code(
            raw(
                "chartline.cmd.clinic-x.scheduling.schedule",
                &steps[0].payload.to_string().into_bytes()
            )
            .await
        ),
        RejectionCode::Validation
    );
    let mut foreign = steps[0].clone();
    foreign.command_id = Uuid::now_v7();
    let reply = scenario::send(
        &app.runtime.bus,
        &app.runtime.root,
        &TenantId::parse("unregistered").unwrap(),
        &foreign,
    )
    .await;
    assert_eq!(code(reply), RejectionCode::UnauthorizedTenant);
    // Another tenant cannot touch this encounter.
    let reply = scenario::send(
        &app.runtime.bus,
        &app.runtime.root,
        &TenantId::parse("default").unwrap(),
        &steps[3],
    )
    .await;
    assert_eq!(
        code(reply),
        RejectionCode::Invariant,
        "the stream must look absent to another tenant"
    );
    // Out of order: sign before the consultation ended.
    let sign = steps.iter().find(|s| s.command == "sign_note").unwrap();
    assert_eq!(
        code(scenario::send(&app.runtime.bus, &app.runtime.root, &tenant(), sign).await),
        RejectionCode::Invariant
    );
    assert_eq!(
        app.runtime.store.stats().await.unwrap().events,
        before,
        "a rejected command appended something"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_visits_are_coded_once_each() {
    let app = Embedded::start().await;
    let day = Utc.with_ymd_and_hms(2026, 3, 3, 0, 0, 0).unwrap();
    let visits: Vec<Visit> = (0..20)
        .map(|i| scenario::synthetic_visit(7, i, day))
        .collect();
    let mut runs = tokio::task::JoinSet::new();
    for visit in visits.clone() {
        let bus = app.runtime.bus.clone();
        let root = app.runtime.root.clone();
        runs.spawn(async move {
            for step in scenario::steps_until_signed(&visit) {
                let reply = scenario::send(&bus, &root, &tenant(), &step).await;
                assert!(
                    matches!(reply, CommandReply::Accepted { .. }),
                    "{}: {reply:?}",
                    step.command
                );
            }
        });
    }
    while let Some(done) = runs.join_next().await {
        done.unwrap();
    }
    let mut coded = BTreeSet::new();
    for visit in &visits {
        let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
        let events = wait_for_event(&app.runtime.store, &stream, "CodesAssigned").await;
        let assignments = events
            .iter()
            .filter(|e| e.event_type.starts_with("Codes"))
            .count();
        assert_eq!(assignments, 1, "{stream} coded {assignments} times");
        coded.insert(stream);
    }
    assert_eq!(coded.len(), 20);
    app.shutdown().await;
}
