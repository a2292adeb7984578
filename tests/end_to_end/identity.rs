//! Identity resolution on registration, through the real command path: a certain
//! match links the known chart's MRN, a twin goes to human review (never auto-linked),
//! a stranger becomes a new patient, and a resolved review opens the write-back gate.

use std::time::Duration;

use chartline::serve_cmd::{self, Runtime, ServeArgs};
use chartline_infra::command::send_command;
use chartline_infra::store::read_whole_stream;
use chartline_proto::commands::{CommandReply, CommandRequest};
use chartline_proto::{Actor, ActorKind, EventEnvelope, StreamId, TenantId};
use serde_json::{Value, json};
use uuid::Uuid;

fn tenant() -> TenantId {
    TenantId::parse("clinic-a").unwrap()
}

async fn start() -> (Runtime, tokio::sync::watch::Sender<bool>) {
    let dir = std::env::temp_dir().join(format!("chartline_t_{}", Uuid::new_v4().simple()));
    let mut args = ServeArgs::embedded(&["clinic-a"]);
    args.only = ["scheduling", "identity", "identity-matcher"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let selected = args.selected().unwrap();
    let runtime = serve_cmd::connect(
        &args,
        &format!("sqlite://{}/e.db", dir.display()),
        &selected,
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = serve_cmd::start(&args, &runtime, &selected, &stopped)
        .await
        .unwrap();
    std::mem::forget(tasks);
    (runtime, stop)
}

async fn identity_command(runtime: &Runtime, command: &str, payload: Value) -> CommandReply {
    let request = CommandRequest {
        command_id: Uuid::now_v7(),
        actor: Actor::new(ActorKind::Staff, "registrar-1"),
        correlation_id: None,
        payload,
    };
    send_command(
        &runtime.bus,
        &runtime.root,
        &tenant(),
        "identity",
        command,
        &request,
        Duration::from_secs(5),
    )
    .await
}

fn person(given: &str, family: &str, sex: &str) -> Value {
    json!({
        "given_name": given,
        "family_name": family,
        "birth_date": "1961-04-12",
        "sex": sex,
        "address_line": "12 Synthetic Street, Apt 4",
        "city": "Springfield",
        "state": "IL",
        "postal_code": "62701",
        "phone": "(217) 555-0142",
        "email": null,
        "time_zone": "America/Chicago",
    })
}

async fn register(runtime: &Runtime, demographics: Value) -> Uuid {
    let patient = Uuid::now_v7();
    let reply = identity_command(
        runtime,
        "register",
        json!({"patient_id": patient, "demographics": demographics, "at": "2026-03-01T09:00:00Z"}),
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    patient
}

/// Waits for the reactor's outcome on the patient's stream.
async fn outcome(runtime: &Runtime, patient: Uuid) -> EventEnvelope {
    let stream = StreamId::for_aggregate("patient", patient);
    for _ in 0..200 {
        let events = read_whole_stream(&runtime.store, &tenant(), &stream)
            .await
            .unwrap();
        if let Some(resolved) = events
            .iter()
            .find(|e| e.metadata.actor.id == "identity-matcher")
        {
            return resolved.clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no identity outcome for {patient}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_linked_reviewed_or_new_and_twins_are_never_auto_linked() {
    let (runtime, _stop) = start().await;
    // A known chart: registered, then linked to its EHR MRN by a registrar.
    let known = register(&runtime, person("Elizabeth", "Synthetica", "female")).await;
    assert_eq!(
        outcome(&runtime, known).await.event_type,
        "NewPatientConfirmed"
    );
    let mrn = json!({"system": "urn:oid:2.16.840.1.113883.3.9999.1", "value": "MRN-000142"});
    let reply = identity_command(&runtime, "link_identifier", json!({"patient_id": known, "identifier": mrn, "match_score": null, "at": "2026-03-01T09:05:00Z"})).await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    // Unrelated people, so the known set is not a single record.
    for (given, family, sex, born, street, phone) in [
        (
            "Bartholomew",
            "Quill",
            "male",
            "1979-11-02",
            "800 Example Avenue",
            "(312) 555-0199",
        ),
        (
            "Cressida",
            "Vantongeren",
            "female",
            "1985-06-21",
            "77 Placeholder Lane",
            "(773) 555-0123",
        ),
    ] {
        let mut other = person(given, family, sex);
        other["birth_date"] = json!(born);
        other["address_line"] = json!(street);
        other["phone"] = json!(phone);
        let id = register(&runtime, other).await;
        assert_eq!(
            outcome(&runtime, id).await.event_type,
            "NewPatientConfirmed"
        );
    }

    // The same person again, with a nickname and different formatting: linked to the chart.
    let mut again = person("Liz", "SYNTHETICA", "female");
    again["address_line"] = json!("12 Synthetic St Apartment 4");
    again["phone"] = json!("217-555-0142");
    let returning = register(&runtime, again).await;
    let linked = outcome(&runtime, returning).await;
    assert_eq!(linked.event_type, "IdentifierLinked", "{}", linked.data);
    assert_eq!(linked.data["identifier"], mrn);

    // A twin: same birth date, address, phone and surname, different given name and sex.
    let twin = register(&runtime, person("Benedict", "Synthetica", "male")).await;
    let reviewed = outcome(&runtime, twin).await;
    assert_eq!(
        reviewed.event_type, "MatchReviewRequested",
        "twins must go to a human: {}",
        reviewed.data
    );
    assert!(
        reviewed.data["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["grade"] != "certain")
    );

    // A stranger: a new chart.
    let mut stranger = person("Octavia", "Nonesuch", "female");
    stranger["birth_date"] = json!("1990-01-30");
    stranger["address_line"] = json!("1 Elsewhere Road");
    stranger["postal_code"] = json!("10001");
    stranger["phone"] = json!("(646) 555-0101");
    let new = register(&runtime, stranger).await;
    assert_eq!(
        outcome(&runtime, new).await.event_type,
        "NewPatientConfirmed"
    );

    // The reviewer resolves the twin as not a match: the patient may now be written to a chart.
    let reply = identity_command(&runtime, "resolve_match", json!({"patient_id": twin, "resolution": {"resolution": "not_a_match"}, "reviewer_id": "him-reviewer-1", "at": "2026-03-01T10:00:00Z"})).await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    let events = read_whole_stream(
        &runtime.store,
        &tenant(),
        &StreamId::for_aggregate("patient", twin),
    )
    .await
    .unwrap();
    let mut state = chartline_domain::patient::Patient::default();
    for envelope in &events {
        let event: chartline_domain::patient::PatientEvent =
            chartline_proto::codec::decode(envelope).unwrap();
        chartline_domain::Aggregate::apply(&mut state, &event);
    }
    assert!(state.status.allows_chart_writes());
}
